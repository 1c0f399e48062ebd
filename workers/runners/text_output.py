"""What a user sees of generated tokens: the decoded text, where each token starts in it, a row cut
at its end token or first stop string, and OpenAI's legacy `logprobs` objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    """One generated sequence cut to what the user sees."""

    text: str
    finish_reason: str
    kept: list[int]  # token ids behind `text`
    counted: int  # completion tokens billed: kept tokens plus the EOS / stop-completing token


class TokenText:
    """Decoding bound to one tokenizer and the token ids that end a row (EOS ids and the pad token)."""

    def __init__(self, tokenizer: Any, end_ids: set[int]) -> None:
        self.tokenizer, self.end_ids = tokenizer, end_ids

    def cut_row(self, ids: list[int], stops: list[str]) -> Row:
        end = next((i for i, t in enumerate(ids) if t in self.end_ids), len(ids))
        text = self.decode(ids[:end])
        hits = [(pos, len(s)) for s in stops if (pos := text.find(s)) >= 0]
        if hits:
            pos, size = min(hits)
            offsets = self.offsets(ids[:end])
            kept = sum(1 for o in offsets if o < pos)
            counted = max(kept, sum(1 for o in offsets if o < pos + size))
            return Row(text[:pos], "stop", ids[:kept], counted)
        if end < len(ids):
            return Row(text, "stop", ids[:end], end + 1)
        return Row(text, "length", ids, len(ids))

    def completion_logprobs(self, steps: list[tuple[float, Any, Any]], row: Row, k: int) -> dict[str, Any]:
        """One row's logprobs for its kept tokens, from what the sampler recorded at each step."""
        kept = steps[:len(row.kept)]
        return self.format_logprobs(row.kept, [chosen for chosen, _, _ in kept],
                                     [self.top(ids[:k], values[:k]) for _, values, ids in kept])

    def chat_logprobs(self, steps: list[tuple[float, Any, Any]], row: Row, k: int) -> list[dict[str, Any]]:
        """OpenAI's chat `logprobs.content`: each kept token with its UTF-8 bytes and its k most
        likely alternatives (ids that decode alike each keep their entry, as in OpenAI's lists)."""
        out = []
        for token, (chosen, values, ids) in zip(row.kept, steps, strict=False):
            out.append({**self._token(token, chosen),
                        "top_logprobs": [self._token(i, v) for i, v in zip(ids[:k], values[:k], strict=True)]})
        return out

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def format_logprobs(self, ids: list[int], chosen: list[Any], tops: list[Any]) -> dict[str, Any]:
        return {
            "tokens": [self.decode([t]) for t in ids],
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": self.offsets(ids),
        }

    def top(self, indices: list[int], values: list[float]) -> dict[str, float]:
        top: dict[str, float] = {}
        for index, value in zip(indices, values, strict=False):
            top.setdefault(self.decode([index]), value)  # distinct ids may decode alike
        return top

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def offsets(self, ids: list[int], window: int = 64) -> list[int]:
        """Where each token starts in the decoded text of `ids`.

        Each token's prefix is decoded from an anchor that moves forward while the text before it
        is settled, so the cost stays linear. A prefix that ends inside a multi-byte character has a
        trailing U+FFFD the full text lacks: such a token starts where that character starts.
        """
        full = self.decode(ids)
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

def join_logprobs(prompt: dict[str, Any], completion: dict[str, Any], shift: int) -> dict[str, Any]:
    """Echoed prompt logprobs followed by the completion's, whose offsets move past the prompt."""
    joined = {key: prompt[key] + completion[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
    joined["text_offset"] = prompt["text_offset"] + [o + shift for o in completion["text_offset"]]
    return joined
