"""Chat completions end to end: the `openai` package against the API, a tiny-chat worker, Redis,
Postgres and S3, changing only base_url and api_key."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [{"role": "system", "content": "You answer in one line."},
                       {"role": "user", "content": "Name a river."}]


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0, timeout=120)


def test_sdk_chat_completions_sync_and_async(stack: Stack, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, seed=11, max_completion_tokens=8,
                                           temperature=0.9, logprobs=True, top_logprobs=2)
    assert isinstance(first, ChatCompletion) and first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason in ("stop", "length")
    content = first.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "".join(t.token for t in content) == first.choices[0].message.content
    assert first.usage is not None and first.usage.completion_tokens == len(content) + (
        first.choices[0].finish_reason == "stop")

    async def again() -> ChatCompletion:
        async with openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0,
                                      timeout=120) as aclient:
            return await aclient.chat.completions.create(model="tiny-chat", messages=MESSAGES, seed=11,
                                                         max_completion_tokens=8, temperature=0.9)

    second = asyncio.run(again())
    assert second.choices[0].message.content == first.choices[0].message.content  # the seed reproduces it
    assert second.system_fingerprint == first.system_fingerprint


def test_chat_refusals_name_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES)
    assert err.value.body["param"] == "body.model" and "no chat template" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert err.value.body["param"] == "body.messages[0].content[1]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES,
                                       tools=[{"type": "function", "function": {"name": "lookup"}}])
    assert err.value.body["param"] == "body.tools"  # type: ignore[index]


def test_chat_batch_file_runs_unchanged(client: openai.OpenAI) -> None:
    asks: list[dict[str, Any]] = [
        {"temperature": 0, "max_tokens": 6},
        {"seed": 3, "n": 2, "max_completion_tokens": 5, "top_p": 0.9},
        {"seed": 5, "logprobs": True, "top_logprobs": 1, "max_completion_tokens": 4, "stop": ["\n"]},
        {"temperature": None, "seed": 8, "max_completion_tokens": 7, "metadata": {"k": "v"}},
    ]
    lines = [{"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-chat", "messages": MESSAGES, **ask}} for i, ask in enumerate(asks)]
    upload = client.files.create(file=("chat.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines)
                                                               .encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                    in ("completed", "failed", "expired", "cancelled") and b, 120, 0.2, "chat batch")
    assert done.status == "completed" and done.request_counts.completed == len(asks), done
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"c-{i}" for i in range(len(asks))]
    bodies = [ChatCompletion.model_validate(o["response"]["body"]) for o in out]
    assert len(bodies[1].choices) == 2
    # Each line alone, through the synchronous endpoint, gives what the batch gave.
    for ask, body in zip(asks, bodies, strict=True):
        alone = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **ask)
        assert [c.message.content for c in alone.choices] == [c.message.content for c in body.choices]


def test_chat_job_through_jobs_api(stack: Stack) -> None:
    with stack.client() as http:
        job = http.post("/v1/jobs", json={"url": "/v1/chat/completions", "priority": 5, "body": {
            "model": "tiny-chat", "messages": MESSAGES, "max_tokens": 3, "temperature": 0}}).json()
        done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"]
                        in ("succeeded", "failed") and j, 60, 0.1, "chat job")
    assert done["status"] == "succeeded", done
    ChatCompletion.model_validate(done["result"])
    assert done["url"] == "/v1/chat/completions"


PLACE = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
         "properties": {"city": {"type": "string", "maxLength": 10}, "rank": {"type": "integer", "minimum": 1,
                                                                           "maximum": 9}}}


def test_structured_outputs_in_a_mixed_chat_batch(stack: Stack, client: openai.OpenAI) -> None:
    import jsonschema
    from pydantic import BaseModel, Field

    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}
    lines = [{"custom_id": f"s-{i}", "url": "/v1/chat/completions",
              "body": {"model": "tiny-chat", "messages": MESSAGES, "seed": i, "max_completion_tokens": 60,
                       **({"response_format": fmt} if i % 2 == 0 else {})}} for i in range(6)]
    with stack.client() as http:
        batch = http.post("/v1/batches", json={"requests": lines}).json()
        done = wait_for(lambda: (b := http.get(f"/v1/batches/{batch['id']}").json())["status"] == "completed" and b,
                        120, 0.2, "structured batch")
        out = [json.loads(x) for x in http.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"s-{i}" for i in range(6)]
    for i, o in enumerate(out):
        content = ChatCompletion.model_validate(o["response"]["body"]).choices[0].message.content
        alone = client.chat.completions.create(**lines[i]["body"]).choices[0].message.content
        assert content == alone  # the same line alone gives the same answer, constrained or not
        if i % 2 == 0:
            jsonschema.validate(json.loads(content or ""), PLACE)

    class Place(BaseModel):  # the SDK's own structured-output helper: a strict json_schema from pydantic
        city: str = Field(max_length=10)
        rank: int = Field(ge=1, le=9)

    parsed = client.chat.completions.parse(model="tiny-chat", messages=MESSAGES, response_format=Place, seed=3,
                                           max_completion_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Place)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "not": {}}}})
    assert err.value.body["param"] == "body.response_format"  # type: ignore[index]
