"""Chat completions on the tiny chat model: its real ChatML template, real tokenizer and the text
runner's batched generate. What a chat request gets is the same alone or in a batch mixed with
completions and other chats, and every response is OpenAI's `chat.completion` to the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from pydantic import BaseModel

from genq.shared.chat import ChatBody, template_of
from genq.shared.registry import load_registry
from genq.shared.schemas import CompletionBody
from genq.workers.runners.base import BatchItem, InvalidRequest, Outcome, RunContext, finish
from genq.workers.runners.text import TextRunner

CONVERSATION = [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": "Where did the train go?"},
    {"role": "assistant", "content": "To the city."},
    {"role": "user", "content": [{"type": "text", "text": "And then?"}, {"type": "text", "text": "Say more."}]},
]


@pytest.fixture(scope="module")
def chat(tiny_dir: Path) -> TextRunner:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-chat")
    assert spec is not None
    runner = TextRunner(spec, device="cpu")
    runner.load()
    return runner


def chat_item(runner: TextRunner, **fields: Any) -> BatchItem:
    body = {"model": "tiny-chat", "messages": CONVERSATION, "max_completion_tokens": 12, **fields}
    it = BatchItem(ChatBody.model_validate(body), RunContext())
    runner.prepare(it)
    return it


def run(runner: TextRunner, items: list[BatchItem]) -> list[Outcome]:
    return [finish(o) for o in runner.run_batch(items)]


def texts(result: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] for c in result["choices"]]


def same_fields(ours: Any, theirs: type[BaseModel], where: str = "") -> None:
    """Every key genq writes is a field of the openai type (recursively), and the type parses it."""
    if isinstance(ours, dict):
        unknown = set(ours) - set(theirs.model_fields)
        assert not unknown, f"{where or 'response'} has fields openai's {theirs.__name__} lacks: {unknown}"
        for name, value in ours.items():
            field = theirs.model_fields[name].annotation
            for candidate in _models(field):
                items = value if isinstance(value, list) else [value]
                for i, v in enumerate(items):
                    if isinstance(v, dict):
                        same_fields(v, candidate, f"{where}.{name}[{i}]")


def _models(annotation: Any) -> list[type[BaseModel]]:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models(a)]


def test_the_prompt_is_the_models_own_template(chat: TextRunner) -> None:
    it = chat_item(chat)
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in CONVERSATION]
    messages[3] = {"role": "user", "content": "And then?\nSay more."}
    expected = chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if not isinstance(expected, list) else expected
    assert it.prepared.prompt_ids == [list(expected)]
    rendered = chat.tokenizer.decode(it.prepared.prompt_ids[0])
    assert rendered.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    result = finish(chat.run_batch([it])[0])
    assert isinstance(result, dict)
    assert result["usage"]["prompt_tokens"] == len(expected)  # usage counts the templated prompt


def test_response_is_openais_chat_completion(chat: TextRunner) -> None:
    result = finish(chat.run_batch([chat_item(chat, logprobs=True, top_logprobs=3, n=2, seed=4)])[0])
    assert isinstance(result, dict)
    same_fields(result, OpenAIChatCompletion)
    parsed = OpenAIChatCompletion.model_validate(result)
    assert parsed.object == "chat.completion" and parsed.id.startswith("chatcmpl-")
    assert parsed.system_fingerprint and parsed.system_fingerprint.startswith("fp_")
    assert [c.index for c in parsed.choices] == [0, 1]
    for choice in parsed.choices:
        assert choice.message.role == "assistant" and choice.message.refusal is None
        assert choice.logprobs is not None and choice.logprobs.content is not None
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        for t in tokens:
            assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3
            assert t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
    usage = parsed.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_and_seeded_chats_are_the_same_alone_and_in_a_mixed_batch(chat: TextRunner) -> None:
    asks = [{"temperature": 0}, {"seed": 7, "n": 2, "top_p": 0.9}, {"seed": 3, "top_k": 5, "temperature": 0.8,
                                                                    "presence_penalty": 0.5}]
    alone = [run(chat, [chat_item(chat, **a)])[0] for a in asks]
    completion = BatchItem(CompletionBody.model_validate({"model": "tiny-chat", "prompt": "Once upon a time",
                                                          "max_tokens": 20, "seed": 1}), RunContext())
    chat.prepare(completion)
    mixed = run(chat, [chat_item(chat, **asks[0]), completion, chat_item(chat, **asks[1]),
                       chat_item(chat, **asks[2], messages=CONVERSATION[:2])])
    for a, m in zip(alone[:2], [mixed[0], mixed[2]], strict=True):
        assert isinstance(a, dict) and isinstance(m, dict)
        assert texts(a) == texts(m)
    assert isinstance(mixed[1], dict) and mixed[1]["object"] == "text_completion"
    # Choice i of seed s is the n=1 request with seed s + i.
    second = run(chat, [chat_item(chat, seed=8, top_p=0.9)])[0]
    assert isinstance(alone[1], dict) and isinstance(second, dict)
    assert texts(alone[1])[1] == texts(second)[0]


def test_logit_bias_steers_generation(chat: TextRunner) -> None:
    token = chat.tokenizer.convert_tokens_to_ids("e")
    result = run(chat, [chat_item(chat, temperature=0, logit_bias={str(token): 100}, max_completion_tokens=5)])[0]
    assert isinstance(result, dict)
    assert texts(result) == ["eeeee"]
    bad = {"logit_bias": {str(10**6): 5}}
    with pytest.raises(InvalidRequest) as err:
        chat_item(chat, **bad)
    assert err.value.param == "body.logit_bias"


def test_token_bounds(chat: TextRunner) -> None:
    it = chat_item(chat, max_completion_tokens=None)
    assert it.prepared.max_tokens == 256  # the registry's max_tokens, inside the 512-token context
    assert chat_item(chat, max_tokens=3, max_completion_tokens=None).prepared.max_tokens == 3
    result = run(chat, [chat_item(chat, max_completion_tokens=4, temperature=0)])[0]
    assert isinstance(result, dict)
    assert result["usage"]["completion_tokens"] <= 4
    with pytest.raises(InvalidRequest) as err:
        chat_item(chat, max_completion_tokens=300)
    assert err.value.param == "body.max_completion_tokens"


def test_a_model_without_a_template_is_refused(tiny_dir: Path, text_runner: TextRunner) -> None:
    assert template_of(str(tiny_dir / "tiny-gpt2")) is None
    assert template_of(str(tiny_dir / "tiny-chat"))
    it = BatchItem(ChatBody.model_validate({"model": "tiny-gpt2", "messages": CONVERSATION}), RunContext())
    with pytest.raises(InvalidRequest) as err:
        text_runner.prepare(it)
    assert err.value.param == "body.model" and "no chat template" in str(err.value)


def test_a_registry_template_serves_a_model_without_one(tiny_dir: Path) -> None:
    spec = load_registry(tiny_dir / "models.toml").get("tiny-gpt2")
    assert spec is not None
    runner = TextRunner(spec.with_options(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                        "{% endfor %}{% if add_generation_prompt %}assistant:"
                                                        "{% endif %}"), device="cpu")
    runner.load()
    it = BatchItem(ChatBody.model_validate({"model": "tiny-gpt2", "messages": CONVERSATION[:2],
                                            "max_tokens": 3}), RunContext())
    runner.prepare(it)
    assert runner.tokenizer.decode(it.prepared.prompt_ids[0]) == (
        "system: Answer briefly.\nuser: Where did the train go?\nassistant:")
    assert isinstance(finish(runner.run_batch([it])[0]), dict)


def test_row_stream_pieces_add_up_to_the_cut_text(chat: TextRunner) -> None:
    from genq.workers.runners.text_output import RowStream

    assert chat.text is not None
    ids = chat.tokenizer("The bells rang — nine times, café ☕ and the boats moved")["input_ids"]
    for stops in ([], ["nine"], ["boats", "x"]):
        stream = RowStream(chat.text, stops, max_tokens=len(ids))
        pieces = [stream.push(t) for t in ids]
        streamed = "".join(pieces)
        final = chat.text.cut_row(ids, stops).text
        assert final.startswith(streamed) and "\ufffd" not in streamed
        assert not any(s in streamed for s in stops)  # never past a stop string
        assert len(streamed) >= len(final) - max((len(s) for s in stops), default=1)
        assert sum(1 for p in pieces if p) > 3
    end = RowStream(chat.text, [], max_tokens=3)
    assert "".join(end.push(t) for t in ids) == chat.text.decode(ids[:3])


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}


def test_json_schema_rows_follow_their_schema_inside_a_mixed_batch(chat: TextRunner) -> None:
    import jsonschema

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    free = {"seed": 9, "max_completion_tokens": 30}
    alone = run(chat, [chat_item(chat, **free)])[0]
    def completion() -> BatchItem:
        it = BatchItem(CompletionBody.model_validate({"model": "tiny-chat", "prompt": "A list:", "max_tokens": 12,
                                                      "temperature": 0}), RunContext())
        chat.prepare(it)
        return it

    structured = [chat_item(chat, seed=s, n=2, response_format=schema_format, max_completion_tokens=120,
                            temperature=0.9) for s in range(3)]
    greedy = chat_item(chat, temperature=0, response_format=schema_format, max_completion_tokens=120)
    objects = [chat_item(chat, seed=s, response_format={"type": "json_object"}, max_completion_tokens=120)
               for s in range(2)]
    outcomes = run(chat, [structured[0], chat_item(chat, **free), completion(), *structured[1:], greedy, *objects])
    results = [o for o in outcomes if isinstance(o, dict)]
    assert len(results) == len(outcomes)
    assert texts(results[1]) == texts(alone)  # a free-text row is unaffected by its constrained batch mates
    completion_alone = run(chat, [completion()])[0]
    assert isinstance(completion_alone, dict)
    assert results[2]["choices"][0]["text"] == completion_alone["choices"][0]["text"]
    for result in [results[0], *results[3:6]]:
        for choice in result["choices"]:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    for result in results[6:]:
        choice = result["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    # Greedy structured output is the same alone as in the batch.
    assert texts(run(chat, [chat_item(chat, temperature=0, response_format=schema_format,
                                      max_completion_tokens=120)])[0]) == texts(results[5])


def test_a_schema_the_library_cannot_compile_is_refused(chat: TextRunner) -> None:
    schema = {"type": "object", "not": {"required": ["a"]}}
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(InvalidRequest) as err:
        chat_item(chat, response_format=bad)
    assert err.value.param == "body.response_format"
