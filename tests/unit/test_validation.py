"""Request-line validation: precise errors naming the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genq.services.validation import parse_json_line, validate_batch, validate_line
from genq.shared.registry import parse_registry

REG = parse_registry("""
[models.t]
kind = "text"
source = "x"
max_tokens = 64
[models.img]
kind = "image"
source = "y"
max_size = 256
max_steps = 50
[models.g]
kind = "gan"
source = "z"
""", Path("."))


def _text(**body: Any) -> dict[str, Any]:
    return {"custom_id": "a", "url": "/v1/completions", "body": {"model": "t", "prompt": "hi", **body}}


def _image(**body: Any) -> dict[str, Any]:
    return {"custom_id": "i", "url": "/v1/images/generations",
            "body": {"model": "img", "prompt": "cat", "size": "64x64", **body}}


def test_valid_lines_are_normalised() -> None:
    ok, errors = validate_line(_text(temperature=0, stop="\n"), 1, REG)
    assert errors == [] and ok is not None
    assert ok.body.sampling is False and ok.body.stop_list == ["\n"]
    img, errors = validate_line(_image(size="64x128", scheduler="ddim"), 1, REG)
    assert errors == [] and (img.body.width, img.body.height) == (64, 128)
    gan, errors = validate_line({**_image(), "body": {"model": "g", "size": "32x32"}}, 1, REG)
    assert errors == [] and gan is not None


@pytest.mark.parametrize("line, param, words", [
    (_text(max_tokens=65), "body.max_tokens", "<= 64 for model 't'"),
    (_text(temperature=-1), "body.temperature", "greater than or equal to 0"),
    (_text(stop=["a", "b", "c", "d", "e"]), "body.stop", "at most 4"),
    (_text(prompt=[]), "body.prompt", "between 1 and 64"),
    (_text(logprobs=21), "body.logprobs", "less than or equal to 20"),
    (_text(stream=True), "body.stream", "only POST /v1/completions streams"),
    (_text(adapter="mine"), "body.adapter", "not registered"),
    ({**_text(), "method": "GET"}, "method", "POST"),
    ({**_text(), "extra": 1}, "extra", "unknown field"),
    (_image(size="500x500"), "body.size", "multiples of 8"),
    (_image(size="big"), "body.size", "WIDTHxHEIGHT"),
    (_image(size="512x512"), "body.size", "at most 256x256"),
    (_image(num_inference_steps=51), "body.num_inference_steps", "<= 50"),
    (_image(num_inference_steps=0), "body.num_inference_steps", "greater than or equal to 1"),
    (_image(scheduler="magic"), "body.scheduler", "'ddim'"),
    (_image(response_format="png"), "body.response_format", "url"),
    ({**_image(), "body": {"model": "t", "prompt": "x"}}, "body.model", "text model and cannot serve"),
    ({**_text(), "body": {"model": "img", "prompt": "x"}}, "body.model", "image model and cannot serve"),
])
def test_errors_name_the_field(line: dict[str, Any], param: str, words: str) -> None:
    ok, errors = validate_line(line, 7, REG)
    assert ok is None and len(errors) >= 1
    err = errors[0].as_dict()
    assert err["param"] == param and err["line"] == 7
    assert words in err["message"] and err["message"].startswith(f"line 7: {param}: ")


@pytest.mark.parametrize("raw, words", [
    (b'{"a": ', "not valid JSON"),
    (b'\xff\xfe{}', "not valid UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_unparseable_lines(raw: bytes, words: str) -> None:
    obj, err = parse_json_line(raw, 4)
    assert obj is None and err is not None and err.line == 4 and words in err.message


def test_batch_rules() -> None:
    lines = [(1, _text()), (2, {**_text(), "custom_id": "b"}), (3, _image())]
    ok, errors = validate_batch(lines, REG, max_lines=10)
    assert errors == [] and [v.line for v in ok] == [1, 2, 3]
    _, errors = validate_batch(lines, REG, max_lines=10, endpoint="/v1/completions")
    assert [(e.line, e.param) for e in errors] == [(3, "url")]
    _, errors = validate_batch(lines, REG, max_lines=2)
    assert errors[0].code == "batch_too_large"
    _, errors = validate_batch([], REG, max_lines=2)
    assert errors[0].param == "requests"


REG_WITH_ADAPTERS = parse_registry("""
[models.t]
kind = "text"
source = "x"
[models.t2]
kind = "text"
source = "x"
[models.img]
kind = "image"
source = "y"
[models.g]
kind = "gan"
source = "z"
[adapters.style]
model = "t"
source = "/loras/style"
""", Path("."))


def test_registry_adapters_resolve_without_a_database() -> None:
    ok, errors = validate_line(_text(adapter="style"), 1, REG_WITH_ADAPTERS)
    assert errors == [] and ok is not None
    assert ok.body.model_dump(exclude_unset=True)["adapter"] == "style"  # what the job row stores


@pytest.mark.parametrize("line, words, code", [
    (_text(adapter="nope"), "adapter 'nope' is not registered", "adapter_not_found"),
    ({**_text(adapter="style"), "body": {"model": "t2", "prompt": "x", "adapter": "style"}},
     "adapter 'style' is for model 't', not 't2'", "invalid_request"),
    ({**_image(), "body": {"model": "g", "size": "32x32", "adapter": "style"}},
     "model 'g' is a gan model, which does not serve adapters", "invalid_request"),
])
def test_adapter_errors_name_the_line_and_field(line: dict[str, Any], words: str, code: str) -> None:
    lines = [(1, {**_text(), "custom_id": "1"}), (2, {**_text(adapter="style"), "custom_id": "2"}),
             (3, {**line, "custom_id": "3"})]
    valid, errors = validate_batch(lines, REG_WITH_ADAPTERS, max_lines=10)
    assert [v.line for v in valid] == [1, 2]
    assert [(e.line, e.param, e.code) for e in errors] == [(3, "body.adapter", code)]
    assert errors[0].as_dict()["message"].startswith(f"line 3: body.adapter: {words}")


HUGE = 200_000  # items in a hostile value: one error each would take pydantic seconds and megabytes
_CHAT = {"model": "t", "messages": [{"role": "user", "content": "hi"}]}


def _chat(message: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    msg = {"role": "user", "content": "hi", **(message or {})}
    return {"custom_id": "c", "url": "/v1/chat/completions", "body": {**_CHAT, "messages": [msg], **body}}


@pytest.mark.parametrize(("line", "param"), [
    (_text(prompt=list(range(HUGE))), "body.prompt"),
    (_text(stop=list(range(HUGE))), "body.stop"),
    (_text(logit_bias={str(i): "x" for i in range(HUGE)}), "body.logit_bias"),
    (_text(**{f"k{i}": 1 for i in range(HUGE)}), "body"),
    (_text(stream_options={f"k{i}": 1 for i in range(HUGE)}), "body.stream_options"),
    (_chat(tools=list(range(HUGE))), "body.tools"),
    (_chat(modalities=list(range(HUGE))), "body.modalities"),
    (_chat({"content": list(range(HUGE))}), "body.messages[0].content"),
    (_chat({"tool_calls": list(range(HUGE))}), "body.messages[0].tool_calls"),
    (_chat(response_format={f"k{i}": 1 for i in range(HUGE)}), "body.response_format"),
    ({**_text(), "webhook_url": "https://example.com/", "webhook_events": list(range(HUGE))}, "webhook_events"),
    ({**_text(), **{f"k{i}": 1 for i in range(HUGE)}}, None),
    ({"custom_id": "e", "url": "/v1/embeddings", "body": {"model": "t", "input": [list(range(HUGE))]}},
     "body.input[0]"),
])
def test_an_oversized_value_is_one_error_found_before_its_items(line: dict[str, Any], param: str | None) -> None:
    """A list or object far over its limit is refused as a whole, before pydantic validates (and
    reports) each of its items: a 30 MB prompt list of numbers used to hold the API for minutes."""
    _, errors = validate_line(line, 1, REG)
    assert len(errors) == 1, [e.as_dict() for e in errors[:3]]
    assert errors[0].param == param, errors[0].as_dict()
    assert len(errors[0].message) < 200 and ("at most" in errors[0].message or "between" in errors[0].message
            or "refused" in errors[0].message), errors[0].as_dict()
