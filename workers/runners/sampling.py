"""Per-row decoding for batched text generation: each row of a batch keeps its own parameters.

`RowSampler` is a transformers logits processor. For every row it applies that row's repetition,
presence and frequency penalties, temperature, top-k and top-p, draws the row's token from the
row's own seeded generator, and returns scores where only that token is finite, so generate's
greedy step takes it. A row's draw depends only on its own logits and its own generator, never on
its batch mates' parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

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


class RowSampler(LogitsProcessor):
    """Decode each row by its own parameters; return scores where only the chosen token is finite.

    Penalties: HF-style repetition penalty over the row's real tokens (never its left padding, so
    padding does not change a row), and OpenAI presence/frequency penalties over generated tokens.
    Logprobs are recorded from the raw scores, before any penalty or temperature. Rows with a
    `response_format` sample only among the tokens their grammar allows now (llguidance masks,
    genq.workers.runners.constrained); once the grammar is complete only EOS is allowed.
    """

    def __init__(self, rows: list[RowParams], pad: list[int], width: int, device: str,
                 formats: ResponseFormats | None = None) -> None:
        self.rows, self.width = rows, width
        t = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        self.pad = t(pad, torch.long)
        self.greedy = t([r.greedy for r in rows], torch.bool)
        self.sampled = [i for i, r in enumerate(rows) if not r.greedy]
        self.temperature = t([r.temperature for r in rows])
        self.top_k = t([r.top_k for r in rows], torch.long)
        self.top_p = t([r.top_p for r in rows])
        self.repetition = t([r.repetition for r in rows])
        self.presence = t([r.presence for r in rows])
        self.frequency = t([r.frequency for r in rows])
        self.any_repetition = any(r.repetition != 1.0 for r in rows)
        self.any_openai = any(r.presence or r.frequency for r in rows)
        biased = [(i, token, value) for i, r in enumerate(rows) for token, value in r.bias.items()]
        self.bias = (t([i for i, _, _ in biased], torch.long), t([k for _, k, _ in biased], torch.long),
                     t([v for _, _, v in biased])) if biased else None
        self.generators = {i: torch.Generator().manual_seed(rows[i].seed) for i in self.sampled}
        self.lp_rows = [i for i, r in enumerate(rows) if r.logprobs >= 0]
        self.lp_k = max((rows[i].logprobs for i in self.lp_rows), default=0)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step: chosen, top values, ids
        self.formats = formats
        self.matchers: list[tuple[int, FormatMatcher]] = [
            (i, r.response_format.matcher()) for i, r in enumerate(rows) if r.response_format is not None]
        assert formats is not None or not self.matchers, "constrained rows need the model's ResponseFormats"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores.float()
        s = self._penalize(input_ids, raw)
        if self.matchers:
            assert self.formats is not None
            s = s.clone() if s is raw else s  # logprobs stay those of the unconstrained model
            self.formats.mask_scores(s, self.matchers)
        chosen = s.argmax(dim=-1)
        if self.sampled:
            chosen[self.sampled] = self._sample(s[self.sampled], self.sampled)
        if self.matchers:
            tokens = chosen.tolist()
            for row, matcher in self.matchers:
                if not matcher.finished:
                    matcher.accept(tokens[row])
        if self.lp_rows:
            self._record(raw, chosen)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)

    def _penalize(self, input_ids: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        batch, vocab = s.shape
        if self.any_repetition:
            real = torch.arange(input_ids.shape[1], device=s.device)[None, :] >= self.pad[:, None]
            ids = torch.where(real, input_ids, vocab)  # padding goes to a spare column, dropped below
            seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=s.device).scatter_(1, ids, True)[:, :vocab]
            p = self.repetition[:, None]
            s = torch.where(seen, torch.where(s < 0, s * p, s / p), s)
        if self.any_openai and input_ids.shape[1] > self.width:
            generated = input_ids[:, self.width:]
            counts = torch.zeros_like(s).scatter_add_(1, generated, torch.ones_like(generated, dtype=s.dtype))
            s = s - counts * self.frequency[:, None] - (counts > 0).to(s.dtype) * self.presence[:, None]
        if self.bias is not None:  # out of place: `s` may still be the raw scores logprobs are read from
            rows, tokens, values = self.bias
            s = s.index_put((rows, tokens), values, accumulate=True)
        return s

    def _sample(self, s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Temperature, then top-k, then top-p, then one draw per row from the row's generator.

        The draw inverts the row's CDF in vocabulary order whatever filters the row or its batch
        mates use, so a row's token depends only on its own logits and its own generator."""
        s = s / self.temperature[rows, None]
        u = torch.cat([torch.rand(1, generator=self.generators[i]) for i in rows]).to(s.device)
        filtered = [n for n, i in enumerate(rows) if self.top_k[i] > 0 or self.top_p[i] < 1.0]
        if filtered:
            s[filtered] = self._filter(s[filtered], [rows[n] for n in filtered])
        cdf = torch.softmax(s, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        return pick.clamp_(max=s.shape[1] - 1)

    def _filter(self, s: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Mask tokens outside each row's top-k and top-p nucleus (ties with the last kept token stay)."""
        k = torch.where(self.top_k[rows] > 0, self.top_k[rows], s.shape[1]).clamp(max=s.shape[1])
        top_p = self.top_p[rows]
        if bool((top_p >= 1.0).all()):  # top-k only: a partial sort is enough
            values = s.topk(int(k.max()), dim=-1).values
            threshold = values.gather(1, (k - 1)[:, None])
        else:
            ordered = s.sort(dim=-1, descending=True).values
            rank = torch.arange(s.shape[1], device=s.device)[None, :]
            ordered = ordered.masked_fill(rank >= k[:, None], float("-inf"))
            probs = torch.softmax(ordered, dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
            keep = ((before < top_p[:, None]) | (rank == 0)) & (rank < k[:, None])
            threshold = ordered.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
        return s.masked_fill(s < threshold, float("-inf"))

    def cpu_records(self) -> list[tuple[list[float], list[list[float]], list[list[int]]]]:
        """Per step: each logprob row's chosen-token logprob, top values and top ids, as lists."""
        if not self.records:
            return []
        picked = torch.stack([p for p, _, _ in self.records]).tolist()
        values = torch.stack([v for _, v, _ in self.records]).tolist()
        ids = torch.stack([i for _, _, i in self.records]).tolist()
        return list(zip(picked, values, ids, strict=True))

    def _record(self, raw: torch.Tensor, chosen: torch.Tensor) -> None:
        lp = torch.log_softmax(raw[self.lp_rows], dim=-1)
        picked = lp.gather(1, chosen[self.lp_rows, None]).squeeze(1)
        values, ids = lp.topk(self.lp_k, dim=-1) if self.lp_k else (lp[:, :0], lp[:, :0].long())
        self.records.append((picked, values, ids))
