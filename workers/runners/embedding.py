"""Embeddings with a sentence-transformers or transformers encoder: OpenAI `/v1/embeddings` requests,
batched by tokens.

An input is a text, tokenized by the model's tokenizer with its special tokens, or a list of token
ids, to which the model's special tokens are added the same way (so the ids of
`tokenizer(text, add_special_tokens=False)` embed exactly like `text`). An input longer than the
model's max_seq_length is refused, as OpenAI refuses one over its limit, rather than cut.

Batching: every request shares the batch key; a request's rows are its inputs, so the batcher
gathers up to `max_batch_size` inputs into one `run_batch` call (one request with more runs alone).
The call sorts its inputs longest first and runs them in forward passes of at most
`max_batch_size` inputs and at most `max_batch_tokens` tokens counting padding (inputs x the
longest), so short inputs fill big passes, long ones small passes, and padding stays small. Jobs
report progress and are cancelled between passes.

Batch invariance: an input's embedding does not depend on what shares its pass beyond float
rounding (the attention mask hides the padding); on tiny-embed an input alone and in mixed-length
batches agreed to within 1e-6 (tests/unit/test_embeddings.py).

`dimensions` keeps the first that many values and normalises them again when the model's
embeddings are normalised (as OpenAI's are); only models registered with `matryoshka = true` take it.
"""

from __future__ import annotations

import base64
import gc
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from genq.shared.options import EmbeddingOptions
from genq.shared.registry import ModelSpec
from genq.shared.schemas import EmbeddingBody
from genq.workers.runners.base import (
    BatchItem,
    Deferred,
    InvalidRequest,
    JobCancelled,
    Outcome,
    RunContext,
    finish,
    module_bytes,
    typed_options,
)
from genq.workers.runners.device import resolve_device, resolve_dtype
from genq.workers.runners.encoders import Encoder, load_encoder
from genq.workers.runners.lora import AdapterLRU


@dataclass
class _Prepared:
    ids: list[list[int]]  # each input's token ids, special tokens included


def embeddings_result(model: str, vectors: torch.Tensor, encoding: str, prompt_tokens: int) -> dict[str, Any]:
    """An OpenAI embeddings response body; with `encoding` "base64" each embedding is the base64
    of its little-endian float32 bytes, as OpenAI sends it."""
    rows = vectors.to(torch.float32).cpu()
    if encoding == "base64":
        values: list[Any] = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode() for row in rows]
    else:
        values = rows.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def plan_passes(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indexes of the inputs in each forward pass: longest first (ties in input order), each pass
    at most `max_rows` inputs and `max_rows x its longest` within `max_tokens` (one input at least)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    passes, start = [], 0
    while start < len(order):
        width = max(1, lengths[order[start]])
        size = max(1, min(max_rows, max_tokens // width))
        passes.append(order[start:start + size])
        start += size
    return passes


class EmbeddingRunner:
    kind: ClassVar[str] = "embedding"
    adapters: AdapterLRU[Any] | None = None  # embedding models serve no LoRA adapters

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.options = typed_options(spec, EmbeddingOptions)
        self.encoder: Encoder | None = None
        self.dimension = 0  # the model's embedding size, known once loaded
        self._special: tuple[list[int], list[int]] = ([], [])  # special tokens before and after an input
        self._vocab = 0  # token ids below this are the tokenizer's
        self._lock = threading.Lock()  # one batch at a time on this model
        self._load_lock = threading.Lock()  # prepare() runs in many job threads at once

    # --- weights -------------------------------------------------------------------------------

    def load(self) -> None:
        with self._load_lock:
            if self.encoder is not None:
                return
            try:
                encoder = load_encoder(self.spec.source, loader=self.options.loader, device=self.device,
                                       dtype=self.dtype, revision=self.options.revision,
                                       normalize=self.options.normalize)
            except ValueError as exc:
                raise RuntimeError(f"model {self.spec.name} cannot be served: {exc}") from exc
            # These first tokenizer calls also settle its padding and truncation state (off), before
            # job threads share it.
            self._special = _special_tokens(encoder.tokenizer)
            self._vocab = len(encoder.tokenizer)
            with torch.inference_mode():  # one probe pass tells the embedding size
                self.dimension = int(encoder.encode([encoder.tokenizer("a")["input_ids"]]).shape[-1])
            self.encoder = encoder

    def unload(self) -> None:
        self.encoder = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        return module_bytes(self.encoder.model) if self.encoder is not None else 0

    def with_special(self, ids: list[int]) -> list[int]:
        before, after = self._special
        return [*before, *ids, *after]

    # --- the batch interface ---------------------------------------------------------------------

    def run(self, body: BaseModel, ctx: RunContext | None = None) -> dict[str, Any]:
        """Serve one request on its own (tests and direct use)."""
        item = BatchItem(body, ctx or RunContext())
        self.prepare(item)
        outcome = finish(self.run_batch([item])[0])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def prepare(self, item: BatchItem) -> None:
        body = item.body
        assert isinstance(body, EmbeddingBody)
        if item.adapter is not None or body.adapter is not None:
            raise InvalidRequest(f"model {self.spec.name} does not serve adapters", "body.adapter")
        if self.encoder is None:
            self.load()
        assert self.encoder is not None
        self.check_dimensions(body)
        inputs = body.inputs
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        ids: list[list[int]] = [[] for _ in inputs]
        if texts:
            encoded = self.encoder.tokenizer([x for _, x in texts])["input_ids"]
            for (i, _), row in zip(texts, encoded, strict=True):
                ids[i] = list(row)
        for i, x in enumerate(inputs):
            if isinstance(x, list):
                if bad := [t for t in x if t >= self._vocab]:
                    raise InvalidRequest(f"token id {bad[0]} is not in the vocabulary of model {self.spec.name} "
                                         f"(ids 0 to {self._vocab - 1})", body.input_param(i))
                ids[i] = self.with_special(x)
        self.check_lengths(body, ids)
        item.prepared = _Prepared(ids)

    def batch_key(self, item: BatchItem) -> Hashable:
        return "embedding"  # any requests share a batch: dimensions and encoding apply per request

    def rows(self, item: BatchItem) -> int:
        return len(item.prepared.ids)

    def run_batch(self, items: list[BatchItem]) -> list[Outcome]:
        with self._lock, torch.inference_mode():
            if self.encoder is None:
                self.load()
            assert self.encoder is not None
            # 1. Every input of every item, planned into token-bounded passes, longest first.
            rows = [(j, k) for j, item in enumerate(items) for k in range(len(item.prepared.ids))]
            lengths = [len(items[j].prepared.ids[k]) for j, k in rows]
            passes = plan_passes(lengths, self.options.max_batch_size, self.options.max_batch_tokens)
            vectors: list[list[torch.Tensor | None]] = [[None] * len(item.prepared.ids) for item in items]
            left = [len(item.prepared.ids) for item in items]
            cancelled: set[int] = set()
            for members in passes:
                # 2. Between passes: drop the rows of cancelled jobs.
                for j in {rows[r][0] for r in members} - cancelled:
                    if items[j].ctx.is_cancelled():
                        cancelled.add(j)
                members = [r for r in members if rows[r][0] not in cancelled]
                if not members:
                    continue
                # 3. One forward pass; the vectors move off the device at once.
                out = self.encoder.encode([items[rows[r][0]].prepared.ids[rows[r][1]] for r in members]).cpu()
                for r, vector in zip(members, out, strict=True):
                    j, k = rows[r]
                    vectors[j][k] = vector
                    left[j] -= 1
                for j in {rows[r][0] for r in members}:
                    total = len(items[j].prepared.ids)
                    items[j].ctx.set_progress((total - left[j]) / total)
            # 4. Truncating, encoding and the response: in each job's own thread (base.Deferred).
            outcomes: list[Outcome] = []
            for j, item in enumerate(items):
                if j in cancelled:
                    outcomes.append(JobCancelled(item.ctx.job_id))
                else:
                    outcomes.append(Deferred(partial(self.respond, item, torch.stack(vectors[j]))))  # type: ignore[arg-type]
            return outcomes

    def respond(self, item: BatchItem, vectors: torch.Tensor) -> dict[str, Any]:
        body = item.body
        assert isinstance(body, EmbeddingBody) and self.encoder is not None
        if body.dimensions is not None and body.dimensions < vectors.shape[-1]:
            vectors = vectors[:, :body.dimensions]
            if self.encoder.normalizes:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return embeddings_result(self.spec.name, vectors, body.encoding_format,
                                 prompt_tokens=sum(len(ids) for ids in item.prepared.ids))

    # --- checks ----------------------------------------------------------------------------------

    def check_dimensions(self, body: EmbeddingBody) -> None:
        if body.dimensions is None:
            return
        if not self.options.matryoshka:
            raise InvalidRequest(f"model {self.spec.name} does not support dimensions: its embeddings may not "
                                 "be truncated", "body.dimensions")
        if body.dimensions > self.dimension:
            raise InvalidRequest(f"dimensions is {body.dimensions}; model {self.spec.name} makes embeddings of "
                                 f"{self.dimension}", "body.dimensions")

    def check_lengths(self, body: EmbeddingBody, ids: list[list[int]]) -> None:
        assert self.encoder is not None
        limit = self.encoder.max_length
        for i, row in enumerate(ids):
            which = f"input {i}" if body.input_param(i) != "body.input" else "the input"
            if not row:
                raise InvalidRequest(f"{which} encodes to no tokens", body.input_param(i))
            if limit is not None and len(row) > limit:
                raise InvalidRequest(f"{which} is {len(row)} tokens; model {self.spec.name} reads at most "
                                     f"{limit} tokens", body.input_param(i))


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT),
    read off an encoded one-letter text."""
    encoded = tokenizer("a", return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    content = [i for i, s in enumerate(special) if not s]
    if not content:
        return [], []
    return list(ids[:content[0]]), list(ids[content[-1] + 1:])
