"""Training files and the create body of fine-tuning jobs (genq.shared.fine_tuning): every refusal
names the line and field, and what is accepted is what the worker will train on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from genq.shared import fine_tuning as ft
from genq.shared.fine_tuning import ChatExample, FineTuningJobCreate, Message, PromptExample, parse_training_file


def _jsonl(*lines: Any) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def _chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}


def test_chat_and_prompt_files_parse_into_examples() -> None:
    chat, errors = parse_training_file(_jsonl(
        _chat({"role": "system", "content": "Be brief."}, USER, {**ANSWER, "weight": 0},
              {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6", "weight": 1}),
        "", _chat(USER, ANSWER)))
    assert errors == []
    assert chat == [
        ChatExample(1, (Message("system", "Be brief."), Message("user", "What is 2+2?"), Message("assistant", "4", 0),
                        Message("user", "And 3+3?"), Message("assistant", "6", 1))),
        ChatExample(3, (Message("user", "What is 2+2?"), Message("assistant", "4"))),  # a blank line still counts
    ]
    prompts, errors = parse_training_file(b"\xef\xbb\xbf" + _jsonl({"prompt": "", "completion": " yes"}))
    assert errors == [] and prompts == [PromptExample(1, "", " yes")]


@pytest.mark.parametrize("line, param, words", [
    (_chat(USER, {"role": "tool", "content": "x"}), "messages[1].role", "tool messages are not supported"),
    (_chat(USER, {"role": "wizard", "content": "x"}), "messages[1].role", "must be one of system, user, assistant"),
    (_chat({"content": "x"}, ANSWER), "messages[0].role", "(got missing)"),
    (_chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, ANSWER),
     "messages[0].content", "content parts (images, audio, files) are not supported"),
    (_chat(USER, {"role": "assistant", "content": None, "tool_calls": []}), "messages[1].tool_calls",
     "tool calls are not supported"),
    (_chat(USER, {"role": "assistant", "content": 4}), "messages[1].content", "must be a string"),
    (_chat(USER, {**ANSWER, "weight": 0.5}), "messages[1].weight", "must be 0 or 1"),
    (_chat(USER, {**ANSWER, "weight": True}), "messages[1].weight", "must be 0 or 1"),
    (_chat({**USER, "weight": 1}, ANSWER), "messages[0].weight", "only assistant messages take a weight"),
    (_chat(USER, {**ANSWER, "name": "bot"}), "messages[1].name", "unknown field"),
    (_chat(USER), "messages", "needs an assistant message with non-empty content"),
    (_chat(USER, {"role": "assistant", "content": "  "}), "messages", "needs an assistant message"),
    (_chat(USER, {**ANSWER, "weight": 0}), "messages", "weight 1"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [USER, ANSWER], "tools": []}, "tools", "tool definitions are not supported"),
    ({"messages": [USER, ANSWER], "extra": 1}, "extra", "unknown field"),
    ({"prompt": "a"}, "completion", "required"),
    ({"prompt": 1, "completion": "b"}, "prompt", "must be a string"),
    ({"prompt": "a", "completion": ""}, "completion", "must not be empty"),
    ({"input": "a"}, None, "must hold `messages` (chat format) or `prompt` and `completion`"),
    ([1, 2], None, "must be a JSON object"),
])
def test_each_bad_line_is_named_with_its_field(line: Any, param: str | None, words: str) -> None:
    first = {"prompt": "a", "completion": "b"} if isinstance(line, dict) and "prompt" in line else _chat(USER, ANSWER)
    examples, errors = parse_training_file(_jsonl(first, line))
    assert len(examples) == 1
    assert [(e.line, e.param) for e in errors] == [(2, param)], errors
    assert words in errors[0].message, errors[0].message


def test_one_format_per_file_and_json_errors() -> None:
    _, errors = parse_training_file(_jsonl({"prompt": "a", "completion": "b"}, _chat(USER, ANSWER), "{nope",
                                           '{"prompt": NaN, "completion": "b"}'))
    assert [(e.line, e.param, e.code) for e in errors] == [(2, None, "invalid_request"), (3, None, "invalid_json"),
                                                            (4, "prompt", "invalid_json")]
    assert "chat format but the file is in prompt-completion format" in errors[0].message
    # The format is the first line's, even when that line is itself bad.
    _, errors = parse_training_file(_jsonl(_chat(USER), {"prompt": "a", "completion": "b"}))
    assert [e.line for e in errors] == [1, 2]
    assert "prompt-completion format but the file is in chat" in errors[1].message


def test_empty_and_oversized_files_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for data in (b"", b"\n\n  \n"):
        examples, errors = parse_training_file(data)
        assert examples == [] and [(e.line, e.message) for e in errors] == [
            (None, "the file holds no training example (one JSON object a line)")]
    monkeypatch.setattr(ft, "MAX_EXAMPLES", 3)
    _, errors = parse_training_file(_jsonl(*[_chat(USER, ANSWER)] * 4))
    assert [(e.line, e.message) for e in errors] == [(4, "a training file holds at most 3 examples")]
    _, errors = parse_training_file(_jsonl(_chat(USER, {"role": "assistant", "content": "x" * 64_001})))
    assert errors[0].param == "messages" and "at most 64000 characters" in errors[0].message


def test_problems_reported_stop_at_the_cap() -> None:
    _, errors = parse_training_file(_jsonl(*[{"prompt": "a"}] * 500))
    assert len(errors) == ft.MAX_ERRORS_REPORTED and errors[-1].line == ft.MAX_ERRORS_REPORTED


BASE = {"model": "tiny-gpt2", "training_file": "file_x"}


@pytest.mark.parametrize("extra, loc, words", [
    ({"hyperparameters": {"n_epochs": 0}}, ("hyperparameters", "n_epochs"), '"auto" or an integer from 1 to 50'),
    ({"hyperparameters": {"batch_size": True}}, ("hyperparameters", "batch_size"), "integer from 1 to 256"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, ("hyperparameters", "learning_rate_multiplier"),
     "above 0"),
    ({"hyperparameters": {"epochs": 3}}, ("hyperparameters", "epochs"), "Extra inputs"),
    ({"method": {"type": "dpo", "dpo": {}}}, ("method", "type"), "only supervised fine-tuning jobs, not dpo"),
    ({"method": {"type": "supervised", "reinforcement": {}}}, ("method", "reinforcement"), "only supervised"),
    ({"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 2}}, ("method",), "not both"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, ("integrations",), "not supported"),
    ({"suffix": "x" * 65}, ("suffix",), "at most 64 characters"),
    ({"suffix": "my:model"}, ("suffix",), "a-z, 0-9"),
    ({"suffix": "Caps"}, ("suffix",), "a-z, 0-9"),
    ({"seed": -1}, ("seed",), "greater than or equal to 0"),
    ({"seed": "7"}, ("seed",), "valid integer"),
    ({"metadata": {str(i): "v" for i in range(17)}}, ("metadata",), "at most 16 items"),
    ({"metadata": {"k": "v" * 513}}, ("metadata", "k"), "at most 512 characters"),
    ({"lora": {"r": 0}}, ("lora", "r"), "greater than or equal to 1"),
    ({"lora": {"dropout": 1}}, ("lora", "dropout"), "less than 1"),
    ({"lora": {"target_modules": []}}, ("lora", "target_modules"), "list of 1 to 64 module names"),
    ({"lora": {"target_modules": ["c_attn;rm"]}}, ("lora", "target_modules"), "module names"),
    ({"lora": {"rank": 8}}, ("lora", "rank"), "Extra inputs"),
    ({"learning_rate": 1}, ("learning_rate",), "Extra inputs"),
])
def test_the_create_body_is_refused_naming_the_field(extra: dict[str, Any], loc: tuple[str, ...], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        FineTuningJobCreate.model_validate({**BASE, **extra})
    errors = info.value.errors()
    assert [tuple(e["loc"][:len(loc)]) for e in errors] == [loc] and words in errors[0]["msg"], errors


def test_hyperparameters_come_from_method_or_the_top_level_and_auto_is_resolved() -> None:
    spec = FineTuningJobCreate.model_validate({**BASE, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}}}, "integrations": []})
    assert ft.resolve_hyperparameters(spec.requested_hyperparameters(), 10) == {
        "n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 0.5}
    old_style = FineTuningJobCreate.model_validate({**BASE, "hyperparameters": {"batch_size": 4}})
    assert ft.resolve_hyperparameters(old_style.requested_hyperparameters(), 10)["batch_size"] == 4
    auto = FineTuningJobCreate.model_validate(BASE).requested_hyperparameters()
    assert ft.resolve_hyperparameters(auto, 10) == {"n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert ft.resolve_hyperparameters(auto, 100)["n_epochs"] == 3
    assert ft.resolve_hyperparameters(auto, 50_000) == {"n_epochs": 1, "batch_size": 16,
                                                        "learning_rate_multiplier": 1.0}


def test_lora_settings_resolve_with_their_defaults() -> None:
    assert ft.resolve_lora(None) == {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": None}
    lora = FineTuningJobCreate.model_validate({**BASE, "lora": {"r": 4, "target_modules": ["c_attn"]}}).lora
    assert ft.resolve_lora(lora) == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["c_attn"]}
    lora = FineTuningJobCreate.model_validate({**BASE, "lora": {"alpha": 3, "target_modules": "all-linear"}}).lora
    assert ft.resolve_lora(lora)["alpha"] == 3.0 and ft.resolve_lora(lora)["target_modules"] == "all-linear"
