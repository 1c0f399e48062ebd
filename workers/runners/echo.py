"""A runner that answers instantly without a model: for smoke tests of a deployment and for
measuring genq's own overhead (bench/). It is a real kind (`kind = "echo"` in the registry)."""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel

from shared.registry import ModelSpec
from shared.schemas import CompletionBody
from workers.runners.base import RunContext


class EchoRunner:
    kind: ClassVar[str] = "echo"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec

    def load(self) -> None:
        pass

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, CompletionBody)
        choices = [
            {"text": prompt, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, prompt in enumerate(p for p in body.prompts for _ in range(body.n))
        ]
        words = sum(len(p.split()) for p in body.prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.spec.name,
            "choices": choices,
            "usage": {"prompt_tokens": words, "completion_tokens": 0, "total_tokens": words},
        }
