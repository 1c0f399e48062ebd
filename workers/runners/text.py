"""Text completion with a Hugging Face causal LM: one OpenAI `/v1/completions` request per run.

All prompts x n go through one left-padded `generate` call. Sampling, penalties, stop strings,
seeds and logprobs follow the OpenAI legacy completions API; `text_offset` counts from the start
of the returned `text` (so with `echo` the prompt tokens start at 0).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from shared.registry import ModelSpec
from shared.schemas import CompletionBody
from workers.runners.base import InvalidRequest, JobCancelled, RunContext, text_completion
from workers.runners.device import resolve_device, resolve_dtype

POLL_SECONDS = 0.2  # how often generation asks whether the job was cancelled


class _OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the generated tokens only (not the prompt)."""

    def __init__(self, prompt_width: int, presence: float, frequency: float) -> None:
        self.prompt_width, self.presence, self.frequency = prompt_width, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0:
            return scores
        ones = torch.ones_like(scores[:, :1]).expand_as(generated)
        counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class _JobWatch(StoppingCriteria):
    """Between tokens: report progress and stop every row once the job is cancelled (throttled)."""

    def __init__(self, ctx: RunContext, prompt_width: int, max_tokens: int) -> None:
        self.ctx, self.prompt_width, self.max_tokens = ctx, prompt_width, max_tokens
        self.cancelled = False
        self._next_poll = 0.0  # poll on the first token

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            self.ctx.set_progress(min(1.0, (input_ids.shape[1] - self.prompt_width) / self.max_tokens))
            self.cancelled = self.cancelled or bool(self.ctx.is_cancelled())
        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


@dataclass
class _Row:
    """One generated sequence cut to what the user sees."""

    text: str
    finish_reason: str
    kept: list[int]  # token ids behind `text`
    counted: int  # completion tokens billed: kept tokens plus the EOS / stop-completing token


class TextRunner:
    kind: ClassVar[str] = "text"

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model: Any = None
        self.tokenizer: Any = None
        self._end_ids: set[int] = set()  # tokens that end a row: EOS ids and the pad token
        # The sampling RNG is process-global: seeding and generating must not interleave.
        self._lock = threading.Lock()

    def load(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(self.spec.source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only batches grow on the right
        model = AutoModelForCausalLM.from_pretrained(self.spec.source, dtype=self.dtype)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self._end_ids = {i for i in eos_ids if i is not None}

    @property
    def context_length(self) -> int | None:
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(self.model.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def run(self, body: BaseModel, ctx: RunContext) -> dict[str, Any]:
        assert isinstance(body, CompletionBody)
        if self.model is None:
            self.load()
        with torch.inference_mode():
            # 1. Tokenize each prompt once and check it fits the model.
            prompt_ids = [self.tokenizer(p)["input_ids"] for p in body.prompts]
            self.check_inputs(body, prompt_ids)
            # 2. Batch prompts x n, left-padded; choice index = prompt_index * n + k.
            rows = [ids for ids in prompt_ids for _ in range(body.n)]
            prompts = [p for p in body.prompts for _ in range(body.n)]
            batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
            width = batch["input_ids"].shape[1]
            # 3. Generate under the seed lock, watching for cancellation between tokens.
            watch = _JobWatch(ctx, width, body.max_tokens)
            out = self.generate(body, batch, watch)
            if watch.cancelled:
                raise JobCancelled(ctx.job_id)
            # 4. Cut each row at EOS or the first stop string.
            generated = out.sequences[:, width:].tolist()
            cut = [self.cut_row(ids, body.stop_list) for ids in generated]
            # 5. Logprobs of the kept tokens, from the raw logits.
            logprobs: list[dict[str, Any] | None] = [None] * len(cut)
            if body.logprobs is not None:
                logprobs = self.completion_logprobs(out.logits, cut, body.logprobs)
                if body.echo:
                    prompt_lp = [self.prompt_logprobs(ids, body.logprobs) for ids in prompt_ids]
                    logprobs = [_join_logprobs(prompt_lp[i // body.n], lp, len(prompts[i]))
                                for i, lp in enumerate(logprobs)]
        # 6. Assemble the OpenAI text_completion.
        choices = [
            {"text": (prompts[i] if body.echo else "") + row.text, "index": i,
             "logprobs": logprobs[i], "finish_reason": row.finish_reason}
            for i, row in enumerate(cut)
        ]
        return text_completion(self.spec.name, choices, prompt_tokens=sum(len(ids) for ids in prompt_ids),
                               completion_tokens=sum(row.counted for row in cut))

    def check_inputs(self, body: CompletionBody, prompt_ids: list[list[int]]) -> None:
        if body.adapter is not None:
            raise InvalidRequest(f"model {self.spec.name} does not serve adapters", "body.adapter")
        if body.max_tokens > self.spec.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {body.max_tokens}; model {self.spec.name} allows at most "
                f"{self.spec.max_tokens}", "body.max_tokens")
        limit = self.context_length
        for i, ids in enumerate(prompt_ids):
            which = f"prompt {i}" if isinstance(body.prompt, list) else "the prompt"
            if not ids:
                raise InvalidRequest(f"{which} encodes to no tokens", "body.prompt")
            if limit is None:
                continue
            if len(ids) >= limit:
                raise InvalidRequest(
                    f"{which} is {len(ids)} tokens; model {self.spec.name} has a context of {limit} tokens",
                    "body.prompt")
            if len(ids) + body.max_tokens > limit:
                raise InvalidRequest(
                    f"{which} ({len(ids)} tokens) plus max_tokens ({body.max_tokens}) exceeds the "
                    f"context of {limit} tokens; use max_tokens <= {limit - len(ids)}", "body.max_tokens")

    def generate(self, body: CompletionBody, batch: Any, watch: _JobWatch) -> Any:
        width = batch["input_ids"].shape[1]
        kwargs: dict[str, Any] = {
            "max_new_tokens": body.max_tokens, "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": body.repetition_penalty, "return_dict_in_generate": True,
            "output_logits": body.logprobs is not None, "stopping_criteria": StoppingCriteriaList([watch]),
        }
        sampling = body.sampling and body.temperature > 0
        if sampling:
            kwargs.update(do_sample=True, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
        else:
            kwargs.update(do_sample=False)
        if body.presence_penalty or body.frequency_penalty:
            penalties = _OpenAIPenalties(width, body.presence_penalty, body.frequency_penalty)
            kwargs["logits_processor"] = LogitsProcessorList([penalties])
        if body.stop_list:
            kwargs.update(stop_strings=body.stop_list, tokenizer=self.tokenizer)
        with self._lock:
            if sampling:
                if body.seed is not None:
                    torch.manual_seed(body.seed)
                else:
                    torch.seed()
            return self.model.generate(**batch, **kwargs)

    def cut_row(self, ids: list[int], stops: list[str]) -> _Row:
        end = next((i for i, t in enumerate(ids) if t in self._end_ids), len(ids))
        text = self._decode(ids[:end])
        hits = [(pos, len(s)) for s in stops if (pos := text.find(s)) >= 0]
        if hits:
            pos, size = min(hits)
            offsets = self._offsets(ids[:end])
            kept = sum(1 for o in offsets if o < pos)
            counted = max(kept, sum(1 for o in offsets if o < pos + size))
            return _Row(text[:pos], "stop", ids[:kept], counted)
        if end < len(ids):
            return _Row(text, "stop", ids[:end], end + 1)
        return _Row(text, "length", ids, len(ids))

    def completion_logprobs(self, logits: tuple[torch.Tensor, ...], rows: list[_Row], k: int) -> list[dict[str, Any]]:
        # Step by step on the device: all steps at once would hold (rows, steps, vocab) log-softmaxes.
        steps = max((len(r.kept) for r in rows), default=0)
        chosen = torch.tensor([r.kept + [0] * (steps - len(r.kept)) for r in rows], device=self.device)
        token_lp, top_lp, top_ids = [], [], []
        for t in range(steps):
            lp = torch.log_softmax(logits[t].float(), dim=-1)
            values, indices = lp.topk(k, dim=-1)
            token_lp.append(lp.gather(1, chosen[:, t:t + 1]).squeeze(1).tolist())
            top_lp.append(values.tolist())
            top_ids.append(indices.tolist())
        return [
            self._format_logprobs(
                row.kept, [token_lp[t][i] for t in range(len(row.kept))],
                [self._top(top_ids[t][i], top_lp[t][i]) for t in range(len(row.kept))])
            for i, row in enumerate(rows)
        ]

    def prompt_logprobs(self, ids: list[int], k: int) -> dict[str, Any]:
        """One forward pass over the prompt: token t is scored by the logits at t - 1."""
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = lp.topk(k, dim=-1)
        chosen = lp.gather(1, torch.tensor(ids[1:], device=self.device)[:, None]).squeeze(1).tolist()
        tops = [self._top(i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=False)]
        return self._format_logprobs(ids, [None, *chosen], [None, *tops])

    def _format_logprobs(self, ids: list[int], chosen: list[Any], tops: list[Any]) -> dict[str, Any]:
        return {
            "tokens": [self._decode([t]) for t in ids],
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": self._offsets(ids),
        }

    def _top(self, indices: list[int], values: list[float]) -> dict[str, float]:
        top: dict[str, float] = {}
        for index, value in zip(indices, values, strict=False):
            top.setdefault(self._decode([index]), value)  # distinct ids may decode alike
        return top

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _offsets(self, ids: list[int], window: int = 64) -> list[int]:
        """Where each token starts in the decoded text of `ids`.

        Each token's prefix is decoded from an anchor that moves forward while the text before it
        is settled, so the cost stays linear. A prefix that ends inside a multi-byte character has a
        trailing U+FFFD the full text lacks: such a token starts where that character starts.
        """
        full = self._decode(ids)
        offsets: list[int] = []
        anchor, base = 0, 0  # ids[:anchor] decode to full[:base]
        for start in range(0, len(ids), window):
            end = min(start + window, len(ids))
            pieces = self.tokenizer.batch_decode(
                [ids[anchor:i] for i in range(start, end + 1)],
                skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for piece in pieces[:-1]:
                while not full.startswith(piece, base):
                    piece = piece[:-1]
                offsets.append(base + len(piece))
            if full.startswith(pieces[-1], base):
                anchor, base = end, base + len(pieces[-1])
        return offsets


def _join_logprobs(prompt: dict[str, Any], completion: dict[str, Any], shift: int) -> dict[str, Any]:
    """Echoed prompt logprobs followed by the completion's, whose offsets move past the prompt."""
    joined = {key: prompt[key] + completion[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
    joined["text_offset"] = prompt["text_offset"] + [o + shift for o in completion["text_offset"]]
    return joined
