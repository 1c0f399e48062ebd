"""A runner that answers without a model: for smoke tests of a deployment and for measuring
genq's own overhead (bench/). It is a real kind (`kind = "echo"` in the registry).

Registry option `delay_s` (default 0) makes each job take that long, in ten steps that report
progress and honour cancellation, which is how tests observe a job mid-run. Option
`batch = true` lets the worker's batcher hand it several jobs at once (one delay for the whole
batch). Runners that misbehave on purpose (kill their worker, fail a batched call) are test
classes built on this one (tests/support/runners.py), named by a registry entry's `runner`."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any, ClassVar

from pydantic import BaseModel

from genq.shared.chat import ChatBody
from genq.shared.options import EchoOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import CompletionBody
from genq.workers.runners.base import (
    BatchItem,
    JobCancelled,
    Outcome,
    RunContext,
    SerialRunner,
    chat_completion,
    text_completion,
    typed_options,
)


class EchoRunner(SerialRunner):
    kind: ClassVar[str] = "echo"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.options = typed_options(spec, EchoOptions)
        self.delay_s = self.options.delay_s
        self.batched = self.options.batch

    def load(self) -> None:
        pass

    def batch_key(self, item: BatchItem) -> Hashable:
        return "echo" if self.batched else id(item)

    def rows(self, item: BatchItem) -> int:
        body = item.body
        assert isinstance(body, CompletionBody | ChatBody)
        prompts = len(body.prompts) if isinstance(body, CompletionBody) else 1
        return prompts * body.n if self.batched else 1

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        if not self.batched:
            return super().run_batch(items)
        for step in range(10 if self.delay_s > 0 else 0):
            time.sleep(self.delay_s / 10)
            for it in items:
                it.ctx.set_progress((step + 1) / 10)
        outcomes: list[Outcome] = []
        for it in items:
            outcomes.append(JobCancelled(it.ctx.job_id) if it.ctx.is_cancelled() else self.run(it.body, RunContext()))
        return outcomes

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, CompletionBody | ChatBody)
        if isinstance(body, ChatBody):  # the last message comes back, n times
            answers = [body.messages[-1].text] * body.n
            words = sum(len(m.text.split()) for m in body.messages)
        else:
            answers = [p for p in body.prompts for _ in range(body.n)]
            words = sum(len(p.split()) for p in body.prompts)
        steps = 10 if self.delay_s > 0 else 0
        for step in range(steps):
            time.sleep(self.delay_s / 10)
            if ctx.is_cancelled():
                raise JobCancelled(ctx.job_id)
            ctx.set_progress((step + 1) / 10)
            if ctx.emit is not None:  # a streaming job sees its answer arrive a tenth at a time
                cut = [(len(a) * step // steps, len(a) * (step + 1) // steps) for a in answers]
                ctx.emit([(i, a[lo:hi]) for i, (a, (lo, hi)) in enumerate(zip(answers, cut, strict=True)) if hi > lo])
        if isinstance(body, ChatBody):
            choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": "stop"} for i, text in enumerate(answers)]
            return chat_completion(self.spec.name, choices, prompt_tokens=words, completion_tokens=0,
                                   fingerprint=self.spec.fingerprint, job_id=ctx.job_id)
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
                   for i, text in enumerate(answers)]
        return text_completion(self.spec.name, choices, prompt_tokens=words, completion_tokens=0, job_id=ctx.job_id)
