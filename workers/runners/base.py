"""What every runner offers the worker: load once, then run one validated request at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

from pydantic import BaseModel

from shared.registry import ModelSpec


class JobCancelled(Exception):
    """Raised by a runner when its context reports that the job was cancelled."""


class InvalidRequest(ValueError):
    """The request cannot be served by this model (e.g. prompt longer than its context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class RunContext:
    """Per-job hooks a runner may use; the defaults make a runner callable without a worker."""

    job_id: str = "job_local"
    set_progress: Callable[[float], None] = lambda p: None
    is_cancelled: Callable[[], bool] = lambda: False
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    kind: ClassVar[str]
    spec: ModelSpec

    def load(self) -> None:
        """Load weights onto the device; called once per process before the first run."""

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        """Serve one validated request; return the OpenAI response body."""
