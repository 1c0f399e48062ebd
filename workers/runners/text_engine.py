"""Iteration-level (continuous) batching for the text runner, over the model's own forward and KV cache.

Why not transformers' continuous-batching engine (`generate_batch`, the manager API): its paged
cache and scheduler are good, but genq promises per row what it cannot give: a row's own seeded
generator, llguidance grammars, logprobs of the raw logits, logit bias and OpenAI penalties, and
peft adapters mixed per row. So this engine keeps transformers' model code and its `DynamicCache`
and schedules rows itself:

- The rows decoding now share one left-padded KV cache: `_Decoding` holds the cache, the mask of
  its real columns and each row's next position. One decode step feeds every row its last token.
  A row that ends (its max_tokens, an end token, a stop string, its job cancelled) leaves at once:
  the cache keeps the other rows (`batch_select_indices`) and drops leading columns that are now
  padding for everyone, so a finished long row costs nothing after it ends.
- New jobs join whenever rows are free: their rows are prefilled apart (`_Prefill`, left-padded,
  a cache of their own), in chunks of `prefill_chunk_tokens` while other rows are decoding so a
  long prompt never stalls them for more than one chunk's forward, and in one pass when nothing
  else runs. Their first token is drawn from the prefill's last logits; then their cache is merged
  into the decoding one, the shorter left-padded to the longer.
- Positions come from each row's count of real tokens, so a row's positions, and what it attends
  to, are those it would have alone: its tokens depend on its own prompt, parameters and generator,
  not on which rows share its steps (up to float rounding across batch shapes, see text.py).

A job's result is handed back (`deliver`) as soon as its last row ends, while the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from genq.workers.runners.base import BatchItem, JobCancelled, Outcome, Pull
from genq.workers.runners.sampling import RowState, StepSampler
from genq.workers.runners.text_output import RowStream

POLL_SECONDS = 0.2  # how often generation reports progress and asks whether jobs were cancelled
ONE_PASS_TOKENS = 16384  # a prefill with no rows decoding runs in one forward up to this many tokens


@dataclass(eq=False)
class Sequence:
    """One row: a choice of one prompt of one job."""

    job: EngineJob
    choice: int
    state: RowState
    stream: RowStream | None = None
    stop_window: int = 0  # tokens to decode when looking for a stop string at the end
    done: bool = False


@dataclass(eq=False)
class EngineJob:
    item: BatchItem
    adapter: str  # peft adapter name of its rows
    rows: list[Sequence] = field(default_factory=list)
    limit: int = 1  # the most tokens one of its rows may generate
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.rows)


class _SlabLayer(DynamicLayer):
    """A DynamicLayer whose keys and values sit in buffers with spare columns: a decoding step writes
    its column in place, where DynamicLayer concatenates (a copy of the whole cache every step)."""

    SPARE = 64  # columns of room made at each (re)allocation

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.set(key_states, value_states)
            return self.keys, self.values
        n, k = self.keys.shape[-2], key_states.shape[-2]
        if self._k is None or self._v is None or self.keys.data_ptr() != self._k.data_ptr() \
                or n + k > self._k.shape[-2]:
            self.set(torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2))
        else:
            self._k[:, :, n:n + k] = key_states
            self._v[:, :, n:n + k] = value_states
            self.keys, self.values = self._k[:, :, :n + k], self._v[:, :, :n + k]
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these keys and values (copied into fresh buffers with room to grow)."""
        n = keys.shape[-2]
        self._k = keys.new_empty((*keys.shape[:2], n + self.SPARE, keys.shape[-1]))
        self._v = values.new_empty((*values.shape[:2], n + self.SPARE, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


class _SlabCache(DynamicCache):
    """A DynamicCache of _SlabLayers."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=_SlabLayer)


class _Decoding:
    """The rows decoding now and their shared KV cache: row i's real columns are mask[i] == 1 (all at
    the right); `positions[i]` is the position of the token row i is fed next, `last[i]`."""

    def __init__(self, rows: list[Sequence], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
                 last: torch.Tensor) -> None:
        self.rows, self.cache, self.mask, self.positions, self.last = rows, cache, mask, positions, last

    def step(self, model: Any, extra: dict[str, Any]) -> torch.Tensor:
        """Feed every row its last token; return the logits of its next one ([rows, vocab])."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                    cache=self.cache, use_cache=True, **extra)
        self.mask, self.positions = mask, self.positions + 1
        return out.logits[:, -1]

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` (indexes, in order) stay; leading columns left all padding are dropped."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        first = int(self.mask.any(dim=0).int().argmax()) if keep else 0
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.set(layer.keys[index, :, first:], layer.values[index, :, first:])
        self.mask = self.mask[:, first:]

    def merge(self, other: _Decoding) -> None:
        """Take `other`'s rows in, after ours; the shorter cache is left-padded to the longer."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad = lambda t, dim: _left_pad(t, width, dim)  # noqa: E731
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.set(torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)]),
                     torch.cat([pad(mine.values, 2), pad(theirs.values, 2)]))
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Prefill:
    """New rows' prompts, left-padded, run through the model in column chunks into a cache of their own."""

    def __init__(self, rows: list[Sequence], pad_id: int, device: str) -> None:
        self.rows = rows
        prompts = [s.state.prompt for s in rows]
        width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = _SlabCache()
        self.done = 0  # columns run so far

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def advance(self, model: Any, extra: dict[str, Any], columns: int) -> torch.Tensor | None:
        """Run the next `columns` columns; once the last has run, return its logits ([rows, vocab])."""
        end = min(self.width, self.done + max(1, columns))
        out = model(input_ids=self.ids[:, self.done:end], attention_mask=self.mask[:, :end],
                    position_ids=self.positions[:, self.done:end], cache=self.cache, use_cache=True,
                    logits_to_keep=1, **extra)
        self.done = end
        return out.logits[:, -1] if end == self.width else None

    def decoding(self, first: list[int]) -> _Decoding:
        """The prefilled rows as decoding rows, each to be fed its first generated token."""
        for layer in self.cache.layers:
            if not isinstance(layer, _SlabLayer):
                raise TypeError(f"continuous batching needs full-attention cache layers, not {type(layer).__name__}")
        last = torch.tensor(first, dtype=torch.long, device=self.ids.device)
        return _Decoding(self.rows, self.cache, self.mask, self.mask.sum(dim=1), last)


@dataclass
class EngineHooks:
    """What the engine needs from its runner and its batcher.

    `pull(choose)` takes the waiting items of this model that `choose(offered, room, in_use)` picks
    (room: rows free; in_use: adapter names of the admitted jobs); `start(item, in_use)` turns one
    into an EngineJob (or raises: the item fails alone); `result(job)` is a finished job's outcome;
    `deliver(item, outcome)` hands it to the job's thread; `scope(names)` gives the model's extra
    arguments for rows of these adapter names; `sampler(rows)` decodes the rows' next tokens;
    `is_end(token)` and `stop_hit(row)` say whether a row ends at its newest token.
    """

    forward: Callable[..., Any]  # the model's forward (it becomes a peft model when an adapter first loads)
    pad_id: int
    device: str
    max_rows: int
    prefill_tokens: int
    sampler: Callable[[list[RowState]], StepSampler]
    start: Callable[[BatchItem, set[str]], EngineJob]
    result: Callable[[EngineJob], Outcome]
    deliver: Callable[[BatchItem, Outcome], None]
    pull: Pull
    choose: Callable[[list[tuple[BatchItem, float]], int, set[str]], list[BatchItem]]
    scope: Callable[[list[str]], Any]
    is_end: Callable[[int], bool]
    stop_hit: Callable[[Sequence], bool]


class Engine:
    """Runs until no row is left and no job waits: admit, prefill a chunk, decode a step, poll."""

    def __init__(self, hooks: EngineHooks) -> None:
        self.h = hooks
        self.decoding: _Decoding | None = None
        self.sampler: StepSampler | None = None  # for self.decoding's rows
        self.prefill: _Prefill | None = None
        self.jobs: list[EngineJob] = []  # admitted, not yet delivered
        self._next_poll = 0.0

    # --- the loop --------------------------------------------------------------------------------

    def run(self, items: list[BatchItem]) -> None:
        self.admit(items)
        while True:
            if self.prefill is None and self.rows_running < self.h.max_rows:
                self.admit(self.h.pull(self._choose))
            if self.prefill is None and self.decoding is None:
                return
            if self.prefill is not None:
                self.advance_prefill()
            if self.decoding is not None:
                self.decode_step()
            self.poll()

    def _choose(self, offered: list[tuple[BatchItem, float]]) -> list[BatchItem]:
        return self.h.choose(offered, self.h.max_rows - self.rows_running, {j.adapter for j in self.jobs})

    @property
    def rows_running(self) -> int:
        return (len(self.decoding.rows) if self.decoding else 0) + (len(self.prefill.rows) if self.prefill else 0)

    def admit(self, items: list[BatchItem]) -> None:
        rows: list[Sequence] = []
        for item in items:
            try:
                job = self.h.start(item, {j.adapter for j in self.jobs})
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                self.h.deliver(item, exc)
                continue
            self.jobs.append(job)
            rows += job.rows
        if rows:
            self.prefill = _Prefill(rows, self.h.pad_id, self.h.device)

    # --- prefill and decode ----------------------------------------------------------------------

    def advance_prefill(self) -> None:
        prefill = self.prefill
        assert prefill is not None
        if self.decoding is None:  # nothing waits on it: one pass, unless it is huge
            columns = max(1, ONE_PASS_TOKENS // len(prefill.rows))
        else:
            columns = max(1, self.h.prefill_tokens // len(prefill.rows))
        with self.h.scope([s.job.adapter for s in prefill.rows]) as extra:
            logits = prefill.advance(self.h.forward, extra, columns)
        if logits is None:
            return
        self.prefill = None
        tokens = self.h.sampler([s.state for s in prefill.rows])(logits)
        joined = prefill.decoding(tokens)
        self._after_tokens(joined.rows, tokens)
        keep = [i for i, s in enumerate(joined.rows) if not s.done]
        if not keep:
            return
        joined.keep(keep)
        if self.decoding is None:
            self.decoding = joined
        else:
            self.decoding.merge(joined)
        self.sampler = None

    def decode_step(self) -> None:
        decoding = self.decoding
        assert decoding is not None
        with self.h.scope([s.job.adapter for s in decoding.rows]) as extra:
            logits = decoding.step(self.h.forward, extra)
        if self.sampler is None:
            self.sampler = self.h.sampler([s.state for s in decoding.rows])
        tokens = self.sampler(logits)
        decoding.last = torch.tensor(tokens, dtype=torch.long, device=decoding.last.device)
        self._after_tokens(decoding.rows, tokens)
        self._drop_done()

    def _after_tokens(self, rows: list[Sequence], tokens: list[int]) -> None:
        """Each row's end conditions after its new token, streamed text, and finished jobs' results."""
        pieces: dict[int, tuple[EngineJob, list[tuple[int, str]]]] = {}
        for row, token in zip(rows, tokens, strict=True):
            if row.stream is not None and not row.job.cancelled and (piece := row.stream.push(token)):
                pieces.setdefault(id(row.job), (row.job, []))[1].append((row.choice, piece))
            if (self.h.is_end(token) or len(row.state.generated) >= row.state.params.max_tokens
                    or (row.stop_window and self.h.stop_hit(row))):
                row.done = True
        for job, deltas in pieces.values():
            emit = job.item.ctx.emit
            assert emit is not None
            emit(deltas)
        for job in {id(r.job): r.job for r in rows if r.done}.values():
            if job.finished and job in self.jobs:
                self.jobs.remove(job)
                self.h.deliver(job.item, self.h.result(job))

    def _drop_done(self) -> None:
        decoding = self.decoding
        assert decoding is not None
        keep = [i for i, s in enumerate(decoding.rows) if not s.done]
        if len(keep) == len(decoding.rows):
            return
        if keep:
            decoding.keep(keep)
        else:
            self.decoding = None
        self.sampler = None

    # --- progress and cancellation ---------------------------------------------------------------

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_SECONDS
        for job in list(self.jobs):
            made = max(len(s.state.generated) for s in job.rows)
            ctx = job.item.ctx
            ctx.set_progress(min(1.0, made / job.limit))
            if ctx.is_cancelled():
                self.cancel(job)

    def cancel(self, job: EngineJob) -> None:
        job.cancelled = True
        for row in job.rows:
            row.done = True
        self.jobs.remove(job)
        self.h.deliver(job.item, JobCancelled(job.item.ctx.job_id))
        if self.decoding is not None and any(s.job is job for s in self.decoding.rows):
            self._drop_done()
        # Rows still being prefilled finish their prefill and are dropped then (done already).
