"""Per-row decoding for batched text generation: each row of a batch keeps its own parameters.

A `RowState` is one row's decoding state: its parameters, its own seeded random generator, its
grammar matcher, the tokens it has generated and the logprobs recorded for them. It lives as long
as the row, whatever rows join or leave the batch around it. `StepSampler` holds the batch's
parameters as tensors for the rows decoding now (rebuilt when rows join or leave) and turns one
step's logits into one token per row: each row's repetition, presence and frequency penalties,
logit bias, grammar mask, temperature, top-k and top-p, then a draw from the row's own generator.
A row's draw depends only on its own logits and its own generator, never on its batch mates'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from genq.shared.schemas import SamplingBody
from genq.workers.runners.base import derive_seed
from genq.workers.runners.constrained import CompiledFormat, FormatMatcher, ResponseFormats


@dataclass
class RowParams:
    """One row's decoding parameters."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition: float
    presence: float
    frequency: float
    max_tokens: int
    seed: int
    logprobs: int  # top logprobs to keep; -1: none asked
    stops: list[str]
    bias: dict[int, float] = field(default_factory=dict)  # OpenAI logit_bias: token id -> added to its logit
    response_format: CompiledFormat | None = None  # the grammar this row's output must follow


def row_params(body: SamplingBody, seed: int, index: int, max_tokens: int,
               response_format: CompiledFormat | None = None) -> RowParams:
    greedy = not (body.sampling and body.temperature > 0)
    logprobs = body.top_logprob_count
    return RowParams(greedy=greedy, temperature=body.temperature or 1.0, top_k=body.top_k, top_p=body.top_p,
                     repetition=body.repetition_penalty, presence=body.presence_penalty,
                     frequency=body.frequency_penalty, max_tokens=max_tokens,
                     seed=derive_seed(seed, index), logprobs=-1 if logprobs is None else logprobs,
                     stops=body.stop_list, bias=body.token_bias, response_format=response_format)


NUCLEUS_SCAN = 1024  # tokens StepSampler scans for a row's top-p nucleus before sorting the whole row

# One step's logprobs of a row: the chosen token's, then the top values and their token ids.
Record = tuple[float, list[float], list[int]]


class RowState:
    """One row while it decodes: its parameters, generator, matcher, tokens and logprob records."""

    def __init__(self, params: RowParams, prompt: list[int]) -> None:
        self.params, self.prompt = params, prompt
        self.generated: list[int] = []
        self.records: list[Record] = []
        self.generator = None if params.greedy else torch.Generator().manual_seed(params.seed)
        self.matcher: FormatMatcher | None = (
            params.response_format.matcher() if params.response_format is not None else None)

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.repetition != 1.0 or bool(p.presence) or bool(p.frequency)


class StepSampler:
    """The sampling tensors of the rows decoding now, in batch order.

    Penalties: HF-style repetition penalty over the row's prompt and generated tokens, and OpenAI
    presence/frequency penalties over its generated tokens. Logprobs are recorded from the raw
    scores, before any penalty or temperature. Rows with a `response_format` sample only among the
    tokens their grammar allows now (llguidance masks, genq.workers.runners.constrained); once the
    grammar is complete only EOS is allowed.
    """

    def __init__(self, rows: list[RowState], device: str, formats: ResponseFormats | None = None) -> None:
        self.rows, self.device = rows, device
        params = [r.params for r in rows]
        t = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        self.temperature = t([p.temperature for p in params])
        self.top_k = t([p.top_k for p in params], torch.long)
        self.top_p = t([p.top_p for p in params])
        self.penalized = [i for i, r in enumerate(rows) if r.penalized]
        biased = [(i, token, value) for i, p in enumerate(params) for token, value in p.bias.items()]
        self.bias = (t([i for i, _, _ in biased], torch.long), t([k for _, k, _ in biased], torch.long),
                     t([v for _, _, v in biased])) if biased else None
        self.lp_rows = [i for i, p in enumerate(params) if p.logprobs >= 0]
        self.lp_k = max((params[i].logprobs for i in self.lp_rows), default=0)
        self.formats = formats
        self.matchers: list[tuple[int, FormatMatcher]] = [
            (i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        assert formats is not None or not self.matchers, "constrained rows need the model's ResponseFormats"

    def __call__(self, scores: torch.Tensor) -> list[int]:
        """Choose each row's next token from its logits ([rows, vocab]); record it in the row."""
        raw = scores.float()
        s = self._penalize(raw)
        if self.matchers:
            assert self.formats is not None
            s = s.clone() if s is raw else s  # logprobs stay those of the unconstrained model
            self.formats.mask_scores(s, self.matchers)
        chosen = s.argmax(dim=-1)
        if self.sampled:
            chosen[self.sampled] = self._sample(s[self.sampled], self.sampled)
        records = self._records(raw, chosen) if self.lp_rows else None
        tokens = chosen.tolist()
        for row, token in zip(self.rows, tokens, strict=True):
            row.generated.append(token)
        for i, matcher in self.matchers:
            if not matcher.finished:
                matcher.accept(tokens[i])
        if records is not None:
            for n, i in enumerate(self.lp_rows):
                self.rows[i].records.append((records[0][n], records[1][n], records[2][n]))
        return tokens

    def _penalize(self, s: torch.Tensor) -> torch.Tensor:
        if self.penalized:
            s = s.clone()
            for i in self.penalized:
                s[i] = penalize_row(self.rows[i], s[i])
        if self.bias is not None:  # out of place: `s` may still be the raw scores logprobs are read from
            rows, tokens, values = self.bias
            s = s.index_put((rows, tokens), values, accumulate=True)
        return s

    def _sample(self, s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Temperature, then top-k, then top-p, then one draw per row from the row's generator.

        The draw inverts the row's CDF in vocabulary order whatever filters the row or its batch
        mates use, so a row's token depends only on its own logits and its own generator."""
        s = s / self.temperature[rows, None]
        u = torch.cat([torch.rand(1, generator=self.rows[i].generator) for i in rows]).to(s.device)
        filtered = [n for n, i in enumerate(rows) if self.top_k[i] > 0 or self.top_p[i] < 1.0]
        if filtered:
            s[filtered] = self._filter(s[filtered], [rows[n] for n in filtered])
        cdf = torch.softmax(s, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        return pick.clamp_(max=s.shape[1] - 1)

    def _filter(self, s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Mask tokens outside each row's top-k and top-p nucleus (ties with the last kept token stay).

        The nucleus is looked for among each row's NUCLEUS_SCAN most likely tokens first (a partial
        sort, ~10x cheaper than sorting the vocabulary); only rows whose nucleus is wider than that
        (flat distributions) sort their whole row."""
        vocab = s.shape[1]
        k = torch.where(self.top_k[rows] > 0, self.top_k[rows], vocab).clamp(max=vocab)
        top_p = self.top_p[rows]
        scan = min(vocab, NUCLEUS_SCAN)
        ordered = s.topk(scan, dim=-1).values
        if bool((top_p >= 1.0).all()) and int(k.max()) <= scan:  # top-k only
            return s.masked_fill(s < ordered.gather(1, (k - 1)[:, None]), float("-inf"))
        rank = torch.arange(scan, device=s.device)[None, :]
        # Probabilities among the row's top-k tokens (all tokens without top-k), in sorted order.
        norm = s.logsumexp(dim=-1)
        if bool((k < vocab).any()):
            norm = torch.where(k < vocab, ordered.masked_fill(rank >= k[:, None], float("-inf")).logsumexp(dim=-1),
                               norm)
        probs = (ordered - norm[:, None]).exp()
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        keep = ((before < top_p[:, None]) | (rank == 0)) & (rank < k[:, None])
        count = keep.sum(dim=-1, keepdim=True)
        threshold = ordered.gather(1, count - 1)
        # Rows to sort whole: a top-k wider than the scan, or a nucleus that may go on past it.
        wide = (((k > scan) & (k < vocab)) | ((count.squeeze(1) == scan) & (k > scan))).nonzero().flatten().tolist()
        if wide:  # the nucleus may go on past the scanned tokens
            threshold[wide] = self._full_threshold(s[wide], k[wide], top_p[wide])
        return s.masked_fill(s < threshold, float("-inf"))

    @staticmethod
    def _full_threshold(s: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        ordered = s.sort(dim=-1, descending=True).values
        rank = torch.arange(s.shape[1], device=s.device)[None, :]
        ordered = ordered.masked_fill(rank >= k[:, None], float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        keep = ((before < top_p[:, None]) | (rank == 0)) & (rank < k[:, None])
        return ordered.gather(1, keep.sum(dim=-1, keepdim=True) - 1)

    def _records(self, raw: torch.Tensor, chosen: torch.Tensor) -> tuple[list[Any], list[Any], list[Any]]:
        lp = torch.log_softmax(raw[self.lp_rows], dim=-1)
        picked = lp.gather(1, chosen[self.lp_rows, None]).squeeze(1)
        values, ids = lp.topk(self.lp_k, dim=-1) if self.lp_k else (lp[:, :0], lp[:, :0].long())
        return picked.tolist(), values.tolist(), ids.tolist()


def penalize_row(row: RowState, s: torch.Tensor) -> torch.Tensor:
    """One row's scores ([vocab]) after its repetition, presence and frequency penalties."""
    p = row.params
    vocab = s.shape[0]
    if p.repetition != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=s.device)
        seen[torch.tensor(row.prompt + row.generated, dtype=torch.long, device=s.device)] = True
        s = torch.where(seen, torch.where(s < 0, s * p.repetition, s / p.repetition), s)
    if (p.presence or p.frequency) and row.generated:
        counts = torch.zeros_like(s).scatter_add_(
            0, torch.tensor(row.generated, dtype=torch.long, device=s.device), torch.ones(len(row.generated),
                                                                                        dtype=s.dtype, device=s.device))
        s = s - counts * p.frequency - (counts > 0).to(s.dtype) * p.presence
    return s
