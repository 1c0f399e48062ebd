"""`stream: true` on the synchronous text endpoints, through the queue: OpenAI's chunks as the
worker makes the text, read by the `openai` package's own stream iterator."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about the old market by the river."}]


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stream_echo(stack: Stack) -> Iterator[None]:
    """A worker for `stream-echo`: an echo that takes 6 s and streams its answer a tenth at a time."""
    proc = stack.start_worker("stream-echo", name="worker-stream-echo")
    stack.wait_worker_ready(proc, "worker-stream-echo")
    yield
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_chat_stream_adds_up_to_the_answer(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": "tiny-chat", "messages": MESSAGES, "seed": 21, "n": 2, "max_completion_tokens": 40,
                           "temperature": 0.8, "stop": ["market"]}
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    texts = ["", ""]
    finish: dict[int, str] = {}
    pieces = 0
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            if choice.delta.content:
                texts[choice.index] += choice.delta.content
                pieces += 1
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts == [c.message.content for c in whole.choices]  # the same seed, streamed or not
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert pieces > 4, "the text came in one piece per choice, not as it was made"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_adds_up_to_the_answer(client: openai.OpenAI, echo: bool) -> None:
    ask: dict[str, Any] = {"model": "tiny-gpt2", "prompt": ["The train", "A queue"], "max_tokens": 24, "seed": 4,
                           "echo": echo}
    whole = client.completions.create(**ask)
    texts = ["", ""]
    finish = {}
    for chunk in client.completions.create(**ask, stream=True):
        assert isinstance(chunk, Completion) and chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_a_client_that_disconnects_cancels_its_job(stack: Stack, stream_echo: None) -> None:
    body = {"model": "stream-echo", "messages": [{"role": "user", "content": "slowly, word by word, please"}],
            "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    first = json.loads(line.removeprefix("data: "))
                    break
        # The response is closed here, mid-stream, after the first piece of text.
        job_id = "job_" + first["id"].removeprefix("chatcmpl-")
        job = wait_for(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["status"] != "running" and j,
                       30, 0.1, "the job to end")
    assert job["status"] == "cancelled", job


def test_stream_refusals(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:  # validation errors come before any event
        client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, stream=True)
    assert err.value.body["param"] == "body.model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:  # refused by the worker: still a plain 400
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "word " * 400}],
                                       stream=True, max_completion_tokens=200)
    assert err.value.body["param"] == "body.max_completion_tokens", err.value.body  # type: ignore[index]
    with stack.client() as http:
        resp = http.post("/v1/jobs", json={"url": "/v1/chat/completions",
                                           "body": {"model": "tiny-chat", "messages": MESSAGES, "stream": True}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "body.stream"
