"""Constrained decoding (workers/runners/constrained.py, shared/response_format.py) with the real
llguidance and the project's tiny byte-level BPE: random logits walked token by token through the
masks always give JSON that parses and fits the schema, and only the constrained rows are touched."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from genq.shared.response_format import check_response_format
from genq.workers.runners.base import InvalidRequest
from genq.workers.runners.constrained import FormatMatcher, ResponseFormats

PAD = 37  # logits wider than the tokenizer, by an amount that is not a multiple of 32
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    },
    "required": ["name", "age", "status", "tags", "address"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any], strict: bool | None = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from genq.workers.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="module")
def formats(tokenizer: Any) -> ResponseFormats:
    return ResponseFormats(tokenizer, len(tokenizer) + PAD, {tokenizer.eos_token_id})


def walk(formats: ResponseFormats, matcher: FormatMatcher, seed: int, bias: torch.Tensor | None = None,
         limit: int = 200) -> list[int]:
    """Greedy decoding of random logits (plus `bias`) under the matcher's masks, to EOS or the limit."""
    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while len(tokens) < limit and not matcher.finished:
        scores = torch.randn(1, formats.vocab_size, generator=gen)
        if bias is not None:
            scores += bias
        formats.mask_scores(scores, [(0, matcher)])
        token = int(scores.argmax())
        if token in formats.eos_ids:
            break
        assert matcher.accept(token), matcher.error
        tokens.append(token)
    assert matcher.finished, f"no complete JSON within {limit} tokens"
    return tokens


def allowed(scores: torch.Tensor) -> set[int]:
    return set(torch.isfinite(scores).nonzero().flatten().tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logits_give_json_that_fits_the_schema(formats: ResponseFormats, tokenizer: Any, seed: int) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    compiled = formats.compile(schema_format(PERSON))
    assert compiled is not None
    data = json.loads(tokenizer.decode(walk(formats, compiled.matcher(), seed)))
    jsonschema.validate(data, PERSON)
    assert list(data) == list(PERSON["properties"])  # the schema's property order, as OpenAI writes it


def test_json_object_gives_a_json_object(formats: ResponseFormats, tokenizer: Any) -> None:
    # Unbiased random logits mostly wander inside a string: favour the tokens that close one.
    closing = [2.5 if any(c in tokenizer.decode([i]) for c in '"}]') else 0.0 for i in range(len(tokenizer))]
    bias = torch.tensor(closing + [0.0] * PAD)
    compiled = formats.compile({"type": "json_object"})
    assert compiled is not None
    outputs = [json.loads(tokenizer.decode(walk(formats, compiled.matcher(), seed, bias))) for seed in range(8)]
    assert all(isinstance(out, dict) for out in outputs)
    assert any(outputs), "every walk gave {}: the test shows nothing"


def test_known_json_is_accepted_token_by_token_then_only_eos(formats: ResponseFormats, tokenizer: Any) -> None:
    matcher = formats.compile({"type": "json_object"}).matcher()  # type: ignore[union-attr]
    for token in tokenizer.encode('{"a": [1, true, null], "b": {"c": "d"}}'):
        scores = torch.zeros(1, formats.vocab_size)
        formats.mask_scores(scores, [(0, matcher)])
        assert token in allowed(scores[0])
        assert not matcher.finished and matcher.accept(token)
    assert matcher.finished
    scores = torch.zeros(1, formats.vocab_size)
    formats.mask_scores(scores, [(0, matcher)])
    assert allowed(scores[0]) == {tokenizer.eos_token_id}


def test_a_json_object_never_starts_with_anything_but_a_brace(formats: ResponseFormats, tokenizer: Any) -> None:
    scores = torch.zeros(1, formats.vocab_size)
    formats.mask_scores(scores, [(0, formats.compile({"type": "json_object"}).matcher())])  # type: ignore[union-attr]
    assert {tokenizer.decode([t]) for t in allowed(scores[0])} == {"{"}


def test_a_batch_masks_only_its_constrained_rows(formats: ResponseFormats, tokenizer: Any) -> None:
    compiled = formats.compile(schema_format(PERSON))
    assert compiled is not None
    row0, row2 = compiled.matcher(), compiled.matcher()
    assert row2.accept(tokenizer.encode("{")[0])  # the two rows in different states
    scores = torch.randn(3, formats.vocab_size, generator=torch.Generator().manual_seed(7))
    before = scores.clone()
    formats.mask_scores(scores, [(0, row0), (2, row2)])
    assert torch.equal(scores[1], before[1])  # the free-text row: bit-identical
    for row, matcher in ((0, row0), (2, row2)):
        alone = before[row:row + 1].clone()
        formats.mask_scores(alone, [(0, matcher)])
        assert torch.equal(scores[row], alone[0])
        kept = allowed(scores[row])
        assert kept and max(kept) < len(tokenizer)  # the padded ids past the tokenizer: never
        assert torch.equal(scores[row, sorted(kept)], before[row, sorted(kept)])  # allowed ones unchanged
    assert allowed(scores[0]) != allowed(scores[2])


def test_a_matcher_that_refused_a_token_allows_only_eos(formats: ResponseFormats, tokenizer: Any) -> None:
    matcher = formats.compile({"type": "json_object"}).matcher()  # type: ignore[union-attr]
    assert not matcher.accept(tokenizer.encode("x")[0])
    assert matcher.finished and matcher.error
    scores = torch.zeros(1, formats.vocab_size)
    formats.mask_scores(scores, [(0, matcher)])
    assert allowed(scores[0]) == {tokenizer.eos_token_id}


def test_every_eos_id_ends_a_complete_row(tokenizer: Any) -> None:
    other = tokenizer.convert_tokens_to_ids("Ġthe")  # a stand-in second EOS (e.g. an end-of-turn id)
    formats = ResponseFormats(tokenizer, len(tokenizer), [tokenizer.eos_token_id, other])
    matcher = formats.compile({"type": "json_object"}).matcher()  # type: ignore[union-attr]
    for token in tokenizer.encode("{}"):
        assert matcher.accept(token)
    scores = torch.zeros(1, formats.vocab_size)
    formats.mask_scores(scores, [(0, matcher)])
    assert allowed(scores[0]) == {tokenizer.eos_token_id, other}


def test_logits_narrower_than_the_tokenizer(tokenizer: Any) -> None:
    formats = ResponseFormats(tokenizer, len(tokenizer) - 24, [tokenizer.eos_token_id])
    scores = torch.zeros(2, formats.vocab_size)
    formats.mask_scores(scores, [(1, formats.compile({"type": "json_object"}).matcher())])  # type: ignore[union-attr]
    assert torch.equal(scores[0], torch.zeros(formats.vocab_size))
    assert len(allowed(scores[1])) >= 1


def test_compiled_formats_are_cached_by_their_json(formats: ResponseFormats) -> None:
    first = formats.compile(schema_format(PERSON, strict=True))
    assert formats.compile(schema_format(json.loads(json.dumps(PERSON)), strict=None)) is first
    assert formats.compile({"type": "json_object"}) is formats.compile({"type": "json_object"})
    assert formats.compile(None) is None and formats.compile({"type": "text"}) is None


def test_cache_size_zero_compiles_every_time(tokenizer: Any) -> None:
    formats = ResponseFormats(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=0)
    assert formats.compile({"type": "json_object"}) is not formats.compile({"type": "json_object"})


BAD_FORMATS = [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema is required"),
    ({"type": "json_schema"}, "response_format.json_schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON, "strict": "yes"}}, "strict"),
    ({"type": "yaml"}, "response_format.type"),
    (schema_format({"type": "object", "properties": {"n": {"type": "integr"}}}), "integr"),
    (schema_format({"type": "string", "pattern": "(("}), "regex"),
    (schema_format({"type": "object", "properties": {"s": {"not": {"type": "string"}}}}), "not"),
]


@pytest.mark.parametrize("fmt, words", BAD_FORMATS)
def test_a_bad_format_is_refused_on_both_sides(formats: ResponseFormats, fmt: dict[str, Any], words: str) -> None:
    message = check_response_format(fmt)
    assert message is not None and words in message
    with pytest.raises(InvalidRequest) as caught:
        formats.compile(fmt)
    assert caught.value.param == "body.response_format" and str(caught.value) == message


@pytest.mark.parametrize("fmt", [None, {"type": "text"}, {"type": "json_object"}, schema_format(PERSON),
                                 schema_format(PERSON, strict=False), schema_format(PERSON, strict=None)])
def test_good_formats_pass_the_shared_check(fmt: dict[str, Any] | None) -> None:
    assert check_response_format(fmt) is None


def test_the_shared_check_imports_no_torch() -> None:
    code = ("import sys; from genq.shared.response_format import check_response_format as check; "
            "assert check({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {'type': 'object'}}}) "
            "is None; assert check({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': "
            "{'type': 'integr'}}}); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)


def test_a_matcher_fills_a_bitmask_row_of_its_own(formats: ResponseFormats) -> None:
    from genq.workers.runners.constrained import apply_bitmask

    matcher = formats.compile(schema_format(PERSON)).matcher()  # type: ignore[union-attr]
    bitmask = formats.allocate_bitmask(2)
    matcher.fill(bitmask, 1)
    assert torch.equal(bitmask[0], torch.full_like(bitmask[0], -1))  # the other row: still all allowed
    by_hand, by_batch = torch.zeros(1, formats.vocab_size), torch.zeros(1, formats.vocab_size)
    apply_bitmask(by_hand, bitmask[1:])
    formats.mask_scores(by_batch, [(0, matcher)])
    assert torch.equal(by_hand, by_batch)
    with pytest.raises(ValueError):
        matcher.fill(torch.full((1, 3), -1, dtype=torch.int32))  # too narrow for the vocabulary
    with pytest.raises(ValueError):
        matcher.fill(torch.full((1, formats.words), -1, dtype=torch.int64))
