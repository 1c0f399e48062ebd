"""A runner that answers without a model: for smoke tests of a deployment and for measuring
genq's own overhead (bench/). It is a real kind (`kind = "echo"` in the registry).

Registry option `delay_s` (default 0) makes each job take that long, in ten steps that report
progress and honour cancellation, which is how tests observe a job mid-run. Option
`abort_on_prompt` (a test aid for fault tolerance) names a prompt that kills the worker process
outright, as an out-of-memory kill or a crashing CUDA kernel would: a "poison" job."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, ClassVar

from pydantic import BaseModel

from shared.registry import ModelSpec
from shared.schemas import CompletionBody
from workers.runners.base import JobCancelled, RunContext, text_completion


class EchoRunner:
    kind: ClassVar[str] = "echo"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.delay_s = float(spec.options.get("delay_s", 0.0))
        self.abort_on_prompt: str | None = spec.options.get("abort_on_prompt")

    def load(self) -> None:
        pass

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, CompletionBody)
        if self.abort_on_prompt is not None and self.abort_on_prompt in body.prompts:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: the process just ends
        for step in range(10 if self.delay_s > 0 else 0):
            time.sleep(self.delay_s / 10)
            if ctx.is_cancelled():
                raise JobCancelled(ctx.job_id)
            ctx.set_progress((step + 1) / 10)
        choices = [
            {"text": prompt, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, prompt in enumerate(p for p in body.prompts for _ in range(body.n))
        ]
        words = sum(len(p.split()) for p in body.prompts)
        return text_completion(self.spec.name, choices, prompt_tokens=words, completion_tokens=0)
