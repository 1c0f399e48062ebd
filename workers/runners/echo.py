"""A runner that answers without a model: for smoke tests of a deployment and for measuring
genq's own overhead (bench/). It is a real kind (`kind = "echo"` in the registry).

Registry option `delay_s` (default 0) makes each job take that long, in ten steps that report
progress and honour cancellation, which is how tests observe a job mid-run. Option
`abort_on_prompt` (a test aid for fault tolerance) names a prompt that kills the worker process
outright, as an out-of-memory kill or a crashing CUDA kernel would: a "poison" job.

Option `batch = true` lets the worker's batcher hand it several jobs at once (one delay for the
whole batch), and `fail_on_prompt` names a prompt that makes a whole batched call raise, as a bad
input can crash a batched kernel: the batcher must then fail that job alone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Hashable
from typing import Any, ClassVar

from pydantic import BaseModel

from genq.shared.registry import ModelSpec
from genq.shared.schemas import CompletionBody
from genq.workers.runners.base import BatchItem, JobCancelled, Outcome, RunContext, SerialRunner, text_completion


class EchoRunner(SerialRunner):
    kind: ClassVar[str] = "echo"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.delay_s = float(spec.options.get("delay_s", 0.0))
        self.abort_on_prompt: str | None = spec.options.get("abort_on_prompt")
        self.fail_on_prompt: str | None = spec.options.get("fail_on_prompt")
        self.batched = bool(spec.options.get("batch", False))
        self.calls: list[int] = []  # items per call, for tests

    @staticmethod
    def batching(spec: ModelSpec) -> bool:
        return bool(spec.options.get("batch", False))

    def load(self) -> None:
        pass

    def batch_key(self, item: BatchItem) -> Hashable:
        return "echo" if self.batched else id(item)

    def rows(self, item: BatchItem) -> int:
        body = item.body
        assert isinstance(body, CompletionBody)
        return len(body.prompts) * body.n if self.batched else 1

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        self.calls.append(len(items))
        if not self.batched:
            return super().run_batch(items)
        if self.fail_on_prompt is not None and any(self.fail_on_prompt in it.body.prompts for it in items):  # type: ignore[attr-defined]
            raise RuntimeError(f"the batched call failed on prompt {self.fail_on_prompt!r}")
        for step in range(10 if self.delay_s > 0 else 0):
            time.sleep(self.delay_s / 10)
            for it in items:
                it.ctx.set_progress((step + 1) / 10)
        outcomes: list[Outcome] = []
        for it in items:
            outcomes.append(JobCancelled(it.ctx.job_id) if it.ctx.is_cancelled() else self.run(it.body, RunContext()))
        return outcomes

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
