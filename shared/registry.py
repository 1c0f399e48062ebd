"""The model registry: public model names mapped to a kind, a source and serving limits.

A registry is a TOML file of `[models.<name>]` tables. Users name models only by these public
names; the source (a hub id or a local directory) never comes from a request. Optional
`[adapters.<name>]` tables name LoRA adapters (`model`, a local `source` directory) that every
tenant may use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from genq.shared.kinds import ADAPTER_KINDS, KINDS
from genq.shared.options import ModelOptions

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")

BUILTIN_TOML = Path(__file__).with_name("models.toml")


class RegistryError(ValueError):
    """A registry file that cannot be used, with the file and entry named."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model. Build one with `model_spec()`, which checks its options."""

    name: str
    kind: str
    source: str
    options: ModelOptions  # the kind's typed options (genq.shared.options)
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    runner: str | None = None  # "module:Class" in place of the kind's runner (plugins, test runners)

    @property
    def queue(self) -> str:
        return f"genq.{self.name}"

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: names the serving configuration (weights, revision, dtype
        and genq's version), so a client sees when the same seed may no longer give the same text."""
        from genq import __version__

        revision = getattr(self.options, "revision", None)
        digest = hashlib.sha256(f"{self.source}|{revision}|{self.dtype}|{__version__}".encode()).hexdigest()
        return f"fp_{digest[:10]}"

    def with_options(self, **changes: Any) -> ModelSpec:
        """The same model with some options changed (checked like the registry's)."""
        options = type(self.options).model_validate({**self.options.model_dump(), **changes})
        return dataclasses.replace(self, options=options)


_SPEC_KEYS = ("kind", "source", "dtype", "device", "runner")


def model_spec(name: str, kind: str, source: str, *, dtype: str = "auto", device: str = "auto",
               runner: str | None = None, where: str = "registry", **options: Any) -> ModelSpec:
    """A model spec with `options` parsed into its kind's options model; RegistryError names the
    entry and key of anything unknown or out of range."""
    if kind not in KINDS:
        raise RegistryError(f"{where}: models.{name}.kind must be one of {', '.join(KINDS)}")
    for key, value in (("dtype", dtype), ("device", device), ("runner", runner)):
        if value is not None and not isinstance(value, str):
            raise RegistryError(f"{where}: models.{name}.{key} must be a string")
    if runner is not None and ":" not in runner:
        raise RegistryError(f"{where}: models.{name}.runner must look like package.module:Class")
    model = KINDS[kind].options
    try:
        parsed = model.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(sorted(set(model.model_fields) | set(_SPEC_KEYS)))
                problems.append(f"models.{name}.{key} is not an option of {kind} models (they take {known})")
            else:
                problems.append(f"models.{name}.{key} {err['msg'].removeprefix('Value error, ')}")
        raise RegistryError(f"{where}: " + "; ".join(problems)) from None
    return ModelSpec(name=name, kind=kind, source=source, options=parsed, dtype=dtype, device=device, runner=runner)


@dataclass(frozen=True)
class AdapterSpec:
    """A registry LoRA adapter: public name, the registered model it adapts, its local directory."""

    name: str
    model: str
    source: str


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    path: Path | None = None
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def names(self) -> list[str]:
        return list(self.models)


def valid_name(name: str) -> bool:
    """Model and adapter names: non-empty, a-z, 0-9, '-', '_' and '.' only."""
    return bool(name) and not set(name) - _NAME_CHARS


def _spec(name: str, raw: dict[str, Any], base: Path, where: str) -> ModelSpec:
    if not valid_name(name):
        raise RegistryError(f"{where}: model name {name!r} must use only a-z, 0-9, '-', '_' and '.'")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise RegistryError(f"{where}: models.{name}.kind must be one of {', '.join(KINDS)}")
    source = raw.get("source")
    if not isinstance(source, str) or not source:
        raise RegistryError(f"{where}: models.{name}.source must be a hub id or a directory")
    # A relative local path is read relative to the registry file, so a registry and its models
    # can move together. Hub ids ("org/name" with no such directory) are kept as they are.
    if source.startswith(("./", "../")):
        source = str((base / source).resolve())
    rest = {k: v for k, v in raw.items() if k not in ("kind", "source")}
    return model_spec(name, kind, source, where=where, **rest)


def parse_registry(text: str, base: Path, where: str = "registry") -> Registry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{where}: not valid TOML: {exc}") from exc
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"{where}: needs at least one [models.<name>] table")
    specs = {n: _spec(n, raw, base, where) for n, raw in models.items()}
    adapters = data.get("adapters", {})
    if not isinstance(adapters, dict):
        raise RegistryError(f"{where}: adapters must be [adapters.<name>] tables")
    return Registry(specs, adapters={n: _adapter(n, raw, specs, base, where) for n, raw in adapters.items()})


def _adapter(name: str, raw: Any, models: dict[str, ModelSpec], base: Path, where: str) -> AdapterSpec:
    if not valid_name(name):
        raise RegistryError(f"{where}: adapter name {name!r} must use only a-z, 0-9, '-', '_' and '.'")
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: adapters.{name} must be a table with model and source")
    model = raw.get("model")
    if not isinstance(model, str) or model not in models:
        raise RegistryError(f"{where}: adapters.{name}.model must name a registered model, not {model!r}")
    if models[model].kind not in ADAPTER_KINDS:
        raise RegistryError(f"{where}: adapters.{name}: model {model} is of kind {models[model].kind}, "
                            f"which does not serve adapters (only {' and '.join(ADAPTER_KINDS)} models do)")
    source = raw.get("source")
    if not isinstance(source, str) or not source:
        raise RegistryError(f"{where}: adapters.{name}.source must be a local directory")
    if source.startswith(("./", "../")):
        source = str((base / source).resolve())
    elif not Path(source).is_absolute():
        raise RegistryError(f"{where}: adapters.{name}.source must be a local directory, absolute or "
                            f"starting with ./ (relative to the registry file), not {source!r}")
    unknown = set(raw) - {"model", "source"}
    if unknown:
        raise RegistryError(f"{where}: adapters.{name} has unknown keys {', '.join(sorted(unknown))}")
    return AdapterSpec(name=name, model=model, source=source)


def load_registry(path: str | Path | None = None) -> Registry:
    """Read a registry file; None reads the built-in one."""
    file = Path(path) if path else BUILTIN_TOML
    try:
        text = file.read_text()
    except OSError as exc:
        raise RegistryError(f"cannot read model registry {file}: {exc.strerror}") from exc
    reg = parse_registry(text, file.parent if path else Path.cwd(), str(file))
    return Registry(reg.models, path=file, adapters=reg.adapters)
