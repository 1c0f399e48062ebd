"""The malformed JSONL corpus in `tests/fuzz/malformed/`, and what genq must answer for each file.

Each case is a list of lines (bytes, joined with `\\n`) and the problems expected, in order, as
(1-based line, param, code, words in the message). A batch of a case with problems is refused whole,
inline or as an uploaded file; a case without problems is accepted. Regenerate the files after
changing a case:

    python -m tests.fuzz.malformed_corpus
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).with_name("malformed")
TEXT_URL, IMAGE_URL = "/v1/completions", "/v1/images/generations"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Problem:
    line: int | None
    param: str | None
    words: str
    code: str = "invalid_request"
    batch_only: bool = False  # a batch rule (custom_id required and unique), not a property of the line


@dataclass
class Case:
    name: str
    endpoint: str = TEXT_URL
    lines: list[bytes] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    final_newline: bool = True

    def add(self, line: bytes | dict[str, Any] | str, *problems: tuple[Any, ...]) -> Case:
        """Append a line and the problems expected on it, as (param, words[, code])."""
        if isinstance(line, dict):
            line = json.dumps(line)
        self.lines.append(line.encode() if isinstance(line, str) else line)
        number = len(self.lines)
        for p in problems:
            param, words, *rest = p
            code = rest[0] if rest else "invalid_request"
            self.problems.append(Problem(number, param, words, code,
                                         batch_only=words.startswith(("duplicate of", "required in a batch"))))
        return self

    def data(self) -> bytes:
        return b"\n".join(self.lines) + (b"\n" if self.final_newline else b"")


def text(cid: str | None, **body: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"url": TEXT_URL, "body": {"model": "tiny-gpt2", "prompt": "hi", **body}}
    if cid is not None:
        line = {"custom_id": cid, **line}
    return line


def image(cid: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "url": IMAGE_URL, "body": {"model": "tiny-sd", "size": "64x64", **body}}


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


BAD_JSON = "invalid_json"


def cases() -> list[Case]:
    out: list[Case] = []

    c = Case("truncated", final_newline=False)  # and the truncated last line has no newline
    c.add(text("t1"))
    c.add(json.dumps(text("t2"))[:-7], (None, "not valid JSON", BAD_JSON))
    c.add('{"custom_id": "t3", "url": "/v1/comp', (None, "Unterminated string", BAD_JSON))
    c.add(text("t4"))
    c.add('{"custom_id": "t5", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "hi"}',
          (None, "not valid JSON", BAD_JSON))
    out.append(c)

    c = Case("syntax")
    c.add('{"custom_id": "s1", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "hi"},}',
          (None, "Expecting property name", BAD_JSON))
    c.add("{'custom_id': 's2'}", (None, "Expecting property name", BAD_JSON))
    c.add('{"custom_id": "s3", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "a\tb"}}',
          (None, "Invalid control character", BAD_JSON))
    c.add(json.dumps(text("s4")) + " trailing", (None, "Extra data", BAD_JSON))
    c.add("// a comment", (None, "Expecting value", BAD_JSON))
    c.add(text("s6"))
    out.append(c)

    c = Case("wrong_types_text")
    c.add({**text("w1"), "custom_id": 5}, ("custom_id", "valid string"))
    c.add({**text("w2"), "method": "GET"}, ("method", "'POST'"))
    c.add({**text("w3"), "url": 7}, ("url", "valid string"))
    c.add({**text("w4"), "body": "a prompt"}, ("body", "valid dictionary"))
    c.add({**text("w5"), "priority": "high"}, ("priority", "valid integer"))
    c.add({**text("w6"), "webhook_url": 5}, ("webhook_url", "valid string"))
    c.add({**text("w7"), "webhook_events": "completed"}, ("webhook_events", "valid list"))
    c.add(text("w8", model=1), ("body.model", "valid string"))
    c.add(text("w9", prompt=5), ("body.prompt", "a valid string or a valid list"))
    c.add(text("w10", prompt=["a", 5]), ("body.prompt[1]", "valid string"))
    c.add(text("w11", max_tokens=[16]), ("body.max_tokens", "valid integer"))
    c.add(text("w12", temperature="hot"), ("body.temperature", "valid number"))
    c.add(text("w13", top_p={}), ("body.top_p", "valid number"))
    c.add(text("w14", n=1.5), ("body.n", "fractional part"))
    c.add(text("w15", stop=5), ("body.stop", "a valid string or a valid list"))
    c.add(text("w16", seed="x"), ("body.seed", "valid integer"))
    c.add(text("w17", logprobs="many"), ("body.logprobs", "valid integer"))
    c.add(text("w18", echo=2), ("body.echo", "valid boolean"))
    c.add(text("w19", do_sample=[]), ("body.do_sample", "valid boolean"))
    c.add(text("w20", stream=True), ("body.stream", "only POST /v1/completions streams"))
    c.add(text("w21", bogus=1), ("body.bogus", "unknown field"))
    c.add({**text("w22"), "extra": 1}, ("extra", "unknown field"))
    c.add({**text("w23"), "custom_id": ""}, ("custom_id", "at least 1 character"))
    c.add(text(None), ("custom_id", "required in a batch"))
    c.add(text("w\u000025"), ("custom_id", "NUL"))
    c.add(text("w26", stop=["a", 5]), ("body.stop[1]", "valid string"))
    c.add(text("w27"))
    out.append(c)

    c = Case("wrong_types_image", endpoint=IMAGE_URL)
    c.add(image("i1", n="x"), ("body.n", "valid integer"))
    c.add(image("i2", size=512), ("body.size", "valid string"))
    c.add(image("i3", size="512"), ("body.size", "512x512"))
    c.add(image("i4", size="100x100"), ("body.size", "multiples of 8"))
    c.add(image("i5", size="512x512"), ("body.size", "at most 256x256"))
    c.add(image("i6", response_format="png"), ("body.response_format", "'url' or 'b64_json'"))
    c.add(image("i7", guidance_scale="x"), ("body.guidance_scale", "valid number"))
    c.add(image("i8", scheduler="foo"), ("body.scheduler", "'ddim'"))
    c.add(image("i9", num_inference_steps=1.5), ("body.num_inference_steps", "fractional part"))
    c.add(image("i10", negative_prompt=5), ("body.negative_prompt", "valid string"))
    c.add(image("i11", prompt=5), ("body.prompt", "valid string"))
    c.add(image("i12", seed=-1), ("body.seed", "greater than or equal to 0"))
    c.add(image("i13"))
    out.append(c)

    c = Case("huge_numbers")
    c.add(json.dumps(text("h1")).replace('"prompt"', '"max_tokens": 1e400, "prompt"'),
          ("body.max_tokens", "finite number"))
    c.add(text("h2", max_tokens=10**100), ("body.max_tokens", "less than or equal to 4096"))
    c.add(text("h3", seed=10**100), ("body.seed", "less than or equal to 9223372036854775807"))
    c.add(json.dumps(text("h4")).replace('"prompt"', '"temperature": 1e400, "prompt"'),
          ("body.temperature", "less than or equal to 2"))
    c.add(json.dumps(text("h5")).replace('"prompt"', '"temperature": -1e400, "prompt"'),
          ("body.temperature", "greater than or equal to 0"))
    c.add({**text("h6"), "priority": 10**100}, ("priority", "less than or equal to 9"))
    c.add(json.dumps(text("h7")).replace('"prompt"', '"n": 1e308, "prompt"'), ("body.n", "too large for an integer"))
    c.add(json.dumps(text("h8")).replace('"prompt"', '"top_k": ' + "9" * 5000 + ', "prompt"'),
          (None, "more than 4300 digits", BAD_JSON))
    c.add(json.dumps(text("h9")).replace('"prompt"', '"temperature": 1e-400, "prompt"'))  # 0.0: greedy
    c.add(text("h10", seed=-(10**100)), ("body.seed", "greater than or equal to 0"))
    c.add(text("h11", max_tokens=2**63), ("body.max_tokens", "less than or equal to 4096"))
    c.add(text("h12", seed=2**63 - 1))
    out.append(c)

    c = Case("deep_nesting")
    c.add(nested(100_000), (None, "nested too deeply", BAD_JSON))
    c.add(json.dumps(text("d2")).replace('"prompt"', f'"user": {nested(20_000)}, "prompt"'),
          (None, "nested too deeply", BAD_JSON))
    c.add(json.dumps(text("d3")).replace('"prompt"', f'"user": {nested(500)}, "prompt"'),
          ("body.user", "valid string"))
    c.add(json.dumps({**text("d4"), "metadata": 0}).replace("0}", '{"a": ' * 300 + "0" + "}" * 301),
          ("metadata", "unknown field"))
    c.add('{"a":' * 20_000, (None, "", BAD_JSON))
    c.add(text("d6"))
    out.append(c)

    c = Case("invalid_utf8")
    c.add(text("u1"))
    c.add(json.dumps(text("u2", prompt="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9"),
          (None, "not valid UTF-8 (at byte", BAD_JSON))
    overlong = json.dumps(text("u3-")).encode().replace(b"u3-", b"u3\xc0\xaf")  # an overlong "/"
    at = overlong.index(b"\xc0") + 1
    c.add(overlong, (None, f"not valid UTF-8 (at byte {at})", BAD_JSON))
    c.add(json.dumps(text("u4", prompt="euro")).encode().replace(b"euro", b"\xe2\x82"),
          (None, "not valid UTF-8", BAD_JSON))
    c.add(json.dumps(text("u5", prompt="\ud800")), ("body.prompt", "unpaired UTF-16 surrogate", BAD_JSON))
    c.add(json.dumps(text("u6\udc00")), ("custom_id", "unpaired UTF-16 surrogate", BAD_JSON))
    c.add(json.dumps(text("u7", prompt="\U0001f600 pair")))  # a valid pair, escaped: fine
    c.add(json.dumps(text("u8", prompt="\u65e5\u672c \U0001f600"), ensure_ascii=False))  # raw UTF-8: fine
    c.add(json.dumps(text("u9", prompt="cesu")).encode().replace(b"cesu", b"\xed\xa0\x80"),
          (None, "not valid UTF-8", BAD_JSON))
    out.append(c)

    c = Case("duplicate_custom_id")
    for i, cid in enumerate(["a", "b", "a", "c", "b", "a"]):
        first = {"a": 1, "b": 2}.get(cid)
        dup = (("custom_id", f"duplicate of line {first}"),) if first and i + 1 != first else ()
        c.add(text(cid), *dup)
    out.append(c)

    c = Case("empty_lines")
    c.add(b"")
    c.add(json.dumps(text("e1")))
    c.add(b"")
    c.add(b"   ")
    c.add(b"\t")
    c.add(json.dumps(text("e2")).encode() + b"\r")  # a CRLF line ending
    c.add(b"\r")
    c.add(text("e3", top_k=-1), ("body.top_k", "greater than or equal to 0"))
    c.add(b"")
    c.add(text("e4"))
    c.add(b"")
    out.append(c)

    out.append(Case("blank_only", lines=[b"", b"  ", b"\t", b""],
                    problems=[Problem(None, "requests", "at least one request line")]))

    c = Case("bom")
    c.add(BOM + json.dumps(text("b1")).encode())  # a byte order mark at the start of the file: ignored
    c.add(text("b2"))
    c.add(BOM + json.dumps(text("b3")).encode(), (None, "byte order mark", BAD_JSON))
    out.append(c)

    c = Case("bom_only_at_start")
    c.add(BOM + json.dumps(text("bs1")).encode())
    c.add(text("bs2"))
    out.append(c)

    c = Case("not_objects")
    for value in ("[1, 2]", '"a string"', "null", "42", "true", "[]"):
        c.add(value, (None, "must be a JSON object"))
    c.add("{}", ("url", "Field required"), ("body", "Field required"))
    c.add(text("n8"))
    out.append(c)

    c = Case("nan_infinity")
    c.add(json.dumps(text("f1")).replace('"prompt"', '"temperature": NaN, "prompt"'),
          ("body.temperature", "NaN is not valid JSON", BAD_JSON))
    c.add(json.dumps(text("f2")).replace('"prompt"', '"top_p": Infinity, "prompt"'),
          ("body.top_p", "Infinity is not valid JSON", BAD_JSON))
    c.add(json.dumps(text("f3")).replace('"prompt"', '"presence_penalty": -Infinity, "prompt"'),
          ("body.presence_penalty", "-Infinity is not valid JSON", BAD_JSON))
    c.add("NaN", (None, "NaN is not valid JSON", BAD_JSON))
    c.add(json.dumps({**text("f5"), "priority": 0}).replace('"priority": 0', '"priority": NaN'),
          ("priority", "NaN is not valid JSON", BAD_JSON))
    c.add(json.dumps(text("f6", prompt=["a", "b"])).replace('"b"', "NaN"),
          ("body.prompt[1]", "NaN is not valid JSON", BAD_JSON))
    c.add(json.dumps(text("f7")).replace('"prompt"', '"temperature": NAN, "prompt"'),
          (None, "Expecting value", BAD_JSON))
    c.add(json.dumps(text("f8")).replace('"prompt"', '"temperature": nan, "prompt"'),
          (None, "Expecting value", BAD_JSON))
    c.add(text("f9", temperature=0.5))
    out.append(c)

    c = Case("long_strings")
    c.add(text("x" * 600), ("custom_id", "at most 512 characters"))
    c.add(text("l2", model="m" * 300), ("body.model", "at most 200 characters"))
    c.add(text("l3", prompt="p" * 40_000), ("body.prompt", "at most 32000 characters"))
    c.add(text("l4", user="u" * 300), ("body.user", "at most 256 characters"))
    c.add({**text("l5"), "webhook_url": "https://example.com/" + "w" * 3000},
          ("webhook_url", "at most 2000 characters"))
    c.add(text("l6", prompt="p" * 20_000))
    c.add(text("l7", stop=["a", "b", "c", "d", "e"]), ("body.stop", "at most 4 stop sequences"))
    c.add(text("l8", prompt=["p"] * 65), ("body.prompt", "between 1 and 64 prompts"))
    c.add(text("l9", **{"k" * 5000: 1}), ("body." + "k" * 5000, "unknown field"))
    out.append(c)
    return out


def write(directory: Path = CORPUS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases():
        path = directory / f"{case.name}.jsonl"
        path.write_bytes(case.data())
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(f"{p.stat().st_size:>8}  {p}")
