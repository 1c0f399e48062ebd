"""What every runner offers the worker: load once, then run one validated request at a time."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from shared.registry import ModelSpec


class JobCancelled(Exception):
    """Raised by a runner when its context reports that the job was cancelled."""


class InvalidRequest(ValueError):
    """The request cannot be served by this model (e.g. prompt longer than its context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _keep_in_memory(outputs: dict[str, bytes]) -> Callable[[str, bytes, str], str]:
    def put(name: str, data: bytes, content_type: str) -> str:
        outputs[name] = data
        return name

    return put


@dataclass
class RunContext:
    """Per-job hooks a runner may use; the defaults make a runner callable without a worker.

    `put_output(name, data, content_type)` stores one output file (an image, say) and returns its
    object key; the worker puts it under `jobs/<job id>/<attempt>/<name>` and removes it again if
    the job does not succeed. The default keeps outputs in `outputs`, for tests and direct use.
    """

    job_id: str = "job_local"
    set_progress: Callable[[float], None] = lambda p: None
    is_cancelled: Callable[[], bool] = lambda: False
    outputs: dict[str, bytes] = field(default_factory=dict)
    put_output: Callable[[str, bytes, str], str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.put_output is None:
            self.put_output = _keep_in_memory(self.outputs)


def text_completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """An OpenAI `text_completion` response body."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def derive_seed(seed: int, index: int) -> int:
    """Image `index` of a request with seed `seed` uses seed + index, so the same request gives the
    same images and image k alone is reproduced by asking for n=1 with seed + k."""
    return (seed + index) % (2**63)


class Runner(Protocol):
    kind: ClassVar[str]
    spec: ModelSpec

    def load(self) -> None:
        """Load weights onto the device; called once per process before the first run."""

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        """Serve one validated request; return the OpenAI response body."""
