"""Runners by model kind. Adding a generation mechanism is one new module plus one line here."""

from __future__ import annotations

import importlib
from typing import Any

from genq.shared.registry import ModelSpec

# kind -> "module:Class", imported lazily so that the API never pulls in torch.
RUNNERS: dict[str, str] = {
    "text": "genq.workers.runners.text:TextRunner",
    "image": "genq.workers.runners.image:ImageRunner",
    "echo": "genq.workers.runners.echo:EchoRunner",
    "gan": "genq.workers.runners.gan:GANRunner",
}


def runner_class(kind: str) -> Any:
    try:
        target = RUNNERS[kind]
    except KeyError:
        raise LookupError(f"no runner for model kind {kind!r} in this version of genq") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def make_runner(spec: ModelSpec, device: str | None = None) -> Any:
    return runner_class(spec.kind)(spec, device=device)
