"""Runners that misbehave on purpose, for fault-tolerance and batching tests. The test registry
names them with `runner = "tests.support.runners:Class"`; workers import them from the checkout
(the test stack puts it on PYTHONPATH). Production runners carry no such hooks."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from pydantic import BaseModel

from genq.shared.schemas import CompletionBody
from genq.workers.runners.base import BatchItem, Outcome, RunContext
from genq.workers.runners.echo import EchoRunner

POISON_PROMPT = "poison"
FAILING_PROMPT = "boom"


class RecordingEchoRunner(EchoRunner):
    """Stores its answer as an output object (`echo.json`), through the worker's own output path,
    so the fault tests can count what each attempt left in storage: exactly one object for a
    succeeded job, none for any other, whatever was killed on the way."""

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        result = super().run(body, ctx)
        assert ctx.put_output is not None
        ctx.put_output("echo.json", json.dumps(result).encode(), "application/json")
        return result


class PoisonEchoRunner(RecordingEchoRunner):
    """Kills its worker process outright on the prompt "poison", as an out-of-memory kill or a
    crashing CUDA kernel would: a poison job."""

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, CompletionBody)
        if POISON_PROMPT in body.prompts:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: the process just ends
        return super().run(body, ctx)


class FailingBatchEchoRunner(EchoRunner):
    """A batched call raises when any of its jobs has the prompt "boom", as a bad input can crash a
    batched kernel: the batcher must then fail that job alone."""

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        if self.batched and any(FAILING_PROMPT in it.body.prompts for it in items):  # type: ignore[attr-defined]
            raise RuntimeError(f"the batched call failed on prompt {FAILING_PROMPT!r}")
        return super().run_batch(items)
