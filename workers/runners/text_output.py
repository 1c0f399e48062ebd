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

class RowStream:
    """One streaming row's text as it is generated, in pieces that are final: decoded from a moving
    prefix (so tokenizers whose pieces read differently alone, like SentencePiece's leading space,
    come out right), holding back an incomplete UTF-8 character and any tail that may still turn
    into a stop string. Ends at an end token, the row's max_tokens or its first stop string."""

    def __init__(self, text: TokenText, stops: list[str], max_tokens: int) -> None:
        self.text, self.stops, self.max_tokens = text, stops, max_tokens
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to what came out last
        self.decoded = ""  # the row's settled text so far
        self.sent = 0  # characters of `decoded` handed out
        self.done = False

    def push(self, token: int) -> str:
        """Take the row's next token; return the text that is now final (often empty)."""
        if self.done or token in self.text.end_ids or len(self.ids) >= self.max_tokens:
            self.done = True
            return ""
        self.ids.append(token)
        before = self.text.decode(self.ids[self.prefix:self.read])
        after = self.text.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # the token ends inside a character, or added no text yet
        self.decoded += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        safe = len(self.decoded) - self.hold
        hits = [pos for s in self.stops if (pos := self.decoded.find(s)) >= 0]
        if hits:
            self.done, safe = True, min(hits)
        piece = self.decoded[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece


def join_logprobs(prompt: dict[str, Any], completion: dict[str, Any], shift: int) -> dict[str, Any]:
    """Echoed prompt logprobs followed by the completion's, whose offsets move past the prompt."""
    joined = {key: prompt[key] + completion[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
    joined["text_offset"] = prompt["text_offset"] + [o + shift for o in completion["text_offset"]]
    return joined
