"""Constrained decoding for OpenAI `response_format`: per-row JSON masks over a model's logits.

llguidance does the work (chosen by bench/constrained_decoding.py: torch-free schema compiling for
the API, no compile step worth caching per tokenizer, no heavy dependencies). Per loaded model the
text runner builds one `ResponseFormats`; per request it compiles the format (cached), per row it
takes a `FormatMatcher`, and per decoding step `mask_scores` sets every token a row's grammar does
not allow to -inf, in place, for the constrained rows only. When a row's matcher is `finished`
(the JSON is complete) only the EOS ids are allowed, so the row must end there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch
from cachetools import LRUCache

from genq.shared.response_format import ResponseFormatError, canonical, json_grammar, schema_of
from genq.workers.runners.base import InvalidRequest

PARAM = "body.response_format"
_SHIFTS = torch.arange(32, dtype=torch.int32)


class FormatMatcher:
    """One row's grammar state: fill its mask, accept each token chosen, say when the JSON is done."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    @property
    def handle(self) -> llguidance.LLMatcher:
        """The llguidance matcher (for the batch fill)."""
        return self._matcher

    def fill(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write this row's allowed tokens into `bitmask[index]` (int32, contiguous, CPU, 32 ids a word)."""
        _check_bitmask(bitmask)
        row = bitmask[index]
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token: int) -> bool:
        """Advance by the token sampled; False if the grammar refused it (the matcher then only allows EOS)."""
        return bool(self._matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        """True once no token but EOS may follow: the JSON is complete (or the matcher failed)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the matcher failed (a refused token), or ''."""
        return self._matcher.get_error()


class CompiledFormat:
    """A response_format compiled for one tokenizer: a pristine matcher that each row copies."""

    def __init__(self, key: str, matcher: llguidance.LLMatcher) -> None:
        self.key = key
        self._initial = matcher

    def matcher(self) -> FormatMatcher:
        """A fresh matcher for one row (a copy of the compiled start state: cheap, thread-safe)."""
        return FormatMatcher(self._initial.deep_copy())


class ResponseFormats:
    """Built once per loaded model: compiles response formats for its tokenizer and masks its scores.

    `vocab_size` is the width of the model's logits, which may exceed len(tokenizer) (a padded
    lm_head); ids past the tokenizer are never allowed. `eos_ids` are the ids that end a row: the
    grammar allows them once the JSON is complete, and only them after that.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], cache_size: int = 128,
                 threads: int | None = None) -> None:
        self.eos_ids = sorted(set(eos_ids))
        if not self.eos_ids:
            raise ValueError("constrained decoding needs at least one EOS id")
        self.vocab_size = vocab_size
        # llguidance refuses a vocabulary narrower than the tokenizer: masks then cover the
        # tokenizer's ids too and mask_scores drops the columns past the logits.
        self.mask_vocab = max(vocab_size, len(tokenizer))
        self.words = (self.mask_vocab + 31) // 32
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.mask_vocab, eos_token=self.eos_ids)
        self._executor = llguidance.LLExecutor(threads)
        self._cache: LRUCache[str, CompiledFormat] = LRUCache(maxsize=cache_size)
        self._lock = threading.Lock()
        self._eos_words = torch.zeros(self.words, dtype=torch.int64)
        for token in self.eos_ids:
            self._eos_words[token // 32] |= 1 << (token % 32)
        self._eos_words = self._eos_words.to(torch.int32)  # bit 31 wraps to the int32 sign bit, as masks use

    def compile(self, response_format: Mapping[str, Any] | None) -> CompiledFormat | None:
        """The compiled grammar for `response_format`, or None for free text; cached by canonical JSON.

        Raises InvalidRequest(message, "body.response_format") for a format it cannot serve.
        """
        try:
            schema = schema_of(response_format)
        except ResponseFormatError as exc:
            raise InvalidRequest(str(exc), PARAM) from None
        if schema is None:
            return None
        key = canonical(schema)
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                return hit
        try:
            grammar = json_grammar(schema)
        except ResponseFormatError as exc:
            raise InvalidRequest(str(exc), PARAM) from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            message = " ".join(matcher.get_error().split())
            raise InvalidRequest(f"response_format.json_schema.schema is not supported: {message}", PARAM)
        compiled = CompiledFormat(key, matcher)
        if self._cache.maxsize > 0:  # cache_size 0: no cache (cachetools refuses every item then)
            with self._lock:
                self._cache[key] = compiled
        return compiled

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """An int32 CPU bitmask for `rows` rows, every token allowed."""
        return torch.full((rows, self.words), -1, dtype=torch.int32)

    def mask_scores(self, scores: torch.Tensor, rows: Sequence[tuple[int, FormatMatcher]]) -> None:
        """Set to -inf, in place, every token that each listed row's grammar forbids now.

        `scores` is [batch, vocab] float; `rows` holds (row index, matcher) for the constrained rows
        only: every other row of `scores` is left bit-identical. The masks of all rows are filled
        in parallel by llguidance's executor; a row whose mask came out empty gets EOS instead, so
        no row is ever left with nothing to sample.
        """
        if not rows:
            return
        bitmask = self.allocate_bitmask(len(rows))
        self._executor.unsafe_compute_mask_ptr([(m.handle, k) for k, (_, m) in enumerate(rows)], bitmask.data_ptr(),
                                               self.words * 4, len(rows))
        empty = ~bitmask.any(dim=1)
        if bool(empty.any()):
            bitmask[empty] = self._eos_words
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=scores.device)
        picked = scores.index_select(0, index)
        apply_bitmask(picked, bitmask.to(scores.device, non_blocking=True))
        scores.index_copy_(0, index, picked)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf, in place, where the bit of a token is 0; columns past the mask are all masked.

    On CUDA this is llguidance's own kernel (torch.compile'd); on the CPU a plain torch version,
    because compiling the kernel there needs a C++ toolchain at run time and ~15 s on first call
    (and importing it loads torch's compiler, hence the late import).
    """
    if logits.device.type == "cuda":
        import llguidance.torch

        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        return
    covered = min(logits.shape[1], bitmask.shape[1] * 32)
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1).bool().flatten(1)[:, :covered]
    logits[:, :covered].masked_fill_(~allowed, float("-inf"))
    logits[:, covered:] = float("-inf")


def _check_bitmask(bitmask: torch.Tensor) -> None:
    """llguidance writes masks through a raw pointer: refuse a tensor it would write past or into wrongly."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2 \
            or not bitmask.is_contiguous():
        raise ValueError("a bitmask must be a contiguous 2-D int32 CPU tensor")
