"""The model registry: public model names mapped to a kind, a source and serving limits.

A registry is a TOML file of `[models.<name>]` tables. Users name models only by these public
names; the source (a hub id or a local directory) never comes from a request.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_KINDS = ("text", "image", "gan", "echo")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")

BUILTIN_TOML = Path(__file__).with_name("models.toml")


class RegistryError(ValueError):
    """A registry file that cannot be used, with the file and entry named."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    source: str
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    max_batch_size: int = 8
    max_tokens: int = 1024  # upper bound for a request's max_tokens
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        return f"genq.{self.name}"


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    path: Path | None = None

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def names(self) -> list[str]:
        return list(self.models)


def _spec(name: str, raw: dict[str, Any], base: Path, where: str) -> ModelSpec:
    if not name or set(name) - _NAME_CHARS:
        raise RegistryError(f"{where}: model name {name!r} must use only a-z, 0-9, '-', '_' and '.'")
    kind = raw.get("kind")
    if kind not in KNOWN_KINDS:
        raise RegistryError(f"{where}: models.{name}.kind must be one of {', '.join(KNOWN_KINDS)}")
    source = raw.get("source")
    if not isinstance(source, str) or not source:
        raise RegistryError(f"{where}: models.{name}.source must be a hub id or a directory")
    # A relative local path is read relative to the registry file, so a registry and its models
    # can move together. Hub ids ("org/name" with no such directory) are kept as they are.
    if source.startswith(("./", "../")):
        source = str((base / source).resolve())
    known = {f for f in ModelSpec.__dataclass_fields__ if f not in ("name", "options")}
    kwargs = {k: raw[k] for k in known if k in raw}
    options = {k: v for k, v in raw.items() if k not in known}
    for key in ("max_batch_size", "max_tokens"):
        if key in kwargs and (not isinstance(kwargs[key], int) or kwargs[key] < 1):
            raise RegistryError(f"{where}: models.{name}.{key} must be a positive integer")
    kwargs.update(source=source, kind=kind)
    return ModelSpec(name=name, options=options, **kwargs)


def parse_registry(text: str, base: Path, where: str = "registry") -> Registry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{where}: not valid TOML: {exc}") from exc
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"{where}: needs at least one [models.<name>] table")
    return Registry({n: _spec(n, raw, base, where) for n, raw in models.items()})


def load_registry(path: str | Path | None = None) -> Registry:
    """Read a registry file; None reads the built-in one."""
    file = Path(path) if path else BUILTIN_TOML
    try:
        text = file.read_text()
    except OSError as exc:
        raise RegistryError(f"cannot read model registry {file}: {exc.strerror}") from exc
    reg = parse_registry(text, file.parent if path else Path.cwd(), str(file))
    return Registry(reg.models, path=file)
