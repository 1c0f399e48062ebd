"""Chat request lines at submit: OpenAI's request surface parses, and what genq cannot honour is a
400 naming the field, never silently dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genq.services.validation import validate_line
from genq.shared.registry import Registry, parse_registry

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def registry(tiny_dir: Path) -> Registry:
    return parse_registry(f"""
[models.chat]
kind = "text"
source = "{tiny_dir / 'tiny-chat'}"
max_tokens = 64
[models.plain]
kind = "text"
source = "{tiny_dir / 'tiny-gpt2'}"
[models.templated]
kind = "text"
source = "{tiny_dir / 'tiny-gpt2'}"
chat_template = "{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"
[models.hub]
kind = "text"
source = "some-org/not-downloaded-here"
[models.img]
kind = "image"
source = "y"
[models.echo]
kind = "echo"
source = "-"
""", Path("."))


def line(model: str = "chat", **body: Any) -> dict[str, Any]:
    return {"custom_id": "c", "url": "/v1/chat/completions", "body": {"model": model, "messages": MESSAGES, **body}}


def error(registry: Registry, obj: dict[str, Any]) -> tuple[str | None, str]:
    ok, errors = validate_line(obj, 3, registry)
    assert ok is None and errors, "expected the line to be refused"
    return errors[0].param, errors[0].message


def test_openai_request_fields_are_accepted(registry: Registry) -> None:
    ok, errors = validate_line(line(
        max_tokens=None, max_completion_tokens=20, temperature=None, top_p=0.5, n=2, stop=["\n", "END"], seed=3,
        logprobs=True, top_logprobs=5, presence_penalty=0.1, frequency_penalty=0.2, logit_bias={"12": -5},
        user="u1", metadata={"run": "7"}, top_k=40, repetition_penalty=1.1, store=False, service_tier="auto",
        tool_choice="none", parallel_tool_calls=True, modalities=["text"],
        response_format={"type": "text"},
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": "Hi", "name": "ann"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}]), 1, registry)
    assert errors == [] and ok is not None
    assert ok.body.temperature == 1.0  # null takes the default


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "body.messages[0].content[0]", "image_url content parts are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "", "format": "wav"}}]}]},
     "body.messages[0].content[0]", "input_audio"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "body.tools", "tool calling"),
    ({"tool_choice": "required"}, "body.tool_choice", "tool calling"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "body.audio", "not supported"),
    ({"modalities": ["text", "audio"]}, "body.modalities", "text only"),
    ({"store": True}, "body.store", "does not store"),
    ({"reasoning_effort": "high"}, "body.reasoning_effort", "not supported"),
    ({"top_logprobs": 3}, "body", "top_logprobs needs logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "body.top_logprobs", "less than or equal to 20"),
    ({"max_completion_tokens": 65}, "body.max_completion_tokens", "must be <= 64"),
    ({"max_tokens": 65}, "body.max_tokens", "must be <= 64"),
    ({"logit_bias": {"abc": 1}}, "body.logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "body.logit_bias", "between -100 and 100"),
    ({"stream": True}, "body.stream", "only POST /v1/chat/completions streams"),
    ({"stream_options": {"include_usage": True}}, "body", "stream_options needs stream"),
    ({"response_format": {"type": "json_schema"}}, "body.response_format", "json_schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                        "not": {}}}}},
     "body.response_format", "not supported"),
    ({"response_format": {"type": "text", "json_schema": {}}}, "body.response_format", "not allowed"),
    ({"messages": []}, "body.messages", "at least 1"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "body.messages[0]", "tool_call_id"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "body.messages[0].role", "Input should be"),
    ({"messages": [{"role": "user"}]}, "body.messages[0]", "content is required"),
    ({"frobnicate": 1}, "body.frobnicate", "unknown field"),
])
def test_what_genq_cannot_honour_is_refused_by_name(registry: Registry, body: dict[str, Any], param: str,
                                                    words: str) -> None:
    got_param, message = error(registry, line(**body))
    assert got_param == param and words in message, message


def test_a_model_without_a_chat_template_is_refused_at_submit(registry: Registry) -> None:
    param, message = error(registry, line("plain"))
    assert param == "body.model" and "has no chat template" in message and "/v1/completions" in message
    ok, errors = validate_line(line("templated"), 1, registry)  # the registry supplies one
    assert errors == [] and ok is not None
    # A hub model not in the local cache cannot be read here: the worker decides.
    assert validate_line(line("hub"), 1, registry)[1] == []


def test_tool_messages_need_a_template_that_renders_them(registry: Registry) -> None:
    tool = [*MESSAGES, {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert validate_line(line(messages=tool), 1, registry)[1] == []  # tiny-chat's template has tool calls
    param, message = error(registry, line("templated", messages=tool))
    assert param == "body.messages[2]" and "no tool messages" in message


def test_structured_outputs_are_accepted(registry: Registry) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "place", "schema": schema,
                                                                                 "strict": True}}):
        assert validate_line(line(response_format=fmt), 1, registry)[1] == []
    param, message = error(registry, line("echo", response_format={"type": "json_object"}))
    assert param == "body.response_format" and "does not constrain" in message


def test_kinds_that_do_not_chat_are_refused(registry: Registry) -> None:
    param, message = error(registry, line("img"))
    assert param == "body.model" and "cannot serve /v1/chat/completions" in message
    assert validate_line(line("echo"), 1, registry)[1] == []
