"""Runner classes by model kind, from the table of kinds (genq.shared.kinds). A registry entry may
name its own class (`runner = "module:Class"`) in place of its kind's."""

from __future__ import annotations

import importlib

from genq.shared.kinds import KINDS
from genq.shared.registry import ModelSpec
from genq.workers.runners.base import Runner


def runner_class(kind: str, target: str | None = None) -> type[Runner]:
    """The class that serves models of `kind` (or `target`, "module:Class"), imported on first use
    so that nothing imports torch before it is needed."""
    if target is None:
        if kind not in KINDS:
            raise LookupError(f"no runner for model kind {kind!r} in this version of genq")
        target = KINDS[kind].runner
    module, _, name = target.partition(":")
    cls: type[Runner] = getattr(importlib.import_module(module), name)
    return cls


def make_runner(spec: ModelSpec, device: str | None = None) -> Runner:
    return runner_class(spec.kind, spec.runner)(spec, device=device)
