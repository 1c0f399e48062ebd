"""Embeddings end to end with the official `openai` package: a batch input file through the Files API
and `batches.create`, the synchronous `client.embeddings.create`, and a single job, through Redis,
a genq worker serving tiny-embed, Postgres and S3. Every vector equals sentence-transformers'
`encode` of the same model in this process."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from tests.support.openai_shapes import check_output_line
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

TEXTS = ["The weather was mild that morning.", "hello",
         "A job queue lets many users ask for work that takes a while, and lets a pool of workers do that "
         "work in the order it arrived.", "bread, apples, cheese and flowers"]
TOO_LONG = " ".join(["word"] * 200)  # tiny-embed reads at most 128 tokens


@pytest.fixture(scope="module")
def embed_worker(stack: Stack) -> Iterator[subprocess.Popen[bytes]]:
    """A worker serving tiny-embed (the shared stack serves the other tiny models)."""
    proc = stack.start_worker("tiny-embed", name="worker-tiny-embed")
    try:
        stack.wait_worker_ready(proc, "worker-tiny-embed", timeout=120)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tiny_registry: Path) -> Any:
    """sentence-transformers on the model directory the worker serves."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_registry.parent / "tiny-embed"), device="cpu")


@pytest.fixture()
def client(stack: Stack, embed_worker: subprocess.Popen[bytes]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-local", max_retries=0, timeout=120)


def _vectors(response: CreateEmbeddingResponse) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float64)


def _line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-embed", **body}}


def test_an_embeddings_batch_file_runs_through_the_sdk(client: openai.OpenAI, reference: Any) -> None:
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    ids = reference.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    lines = [*(_line(f"one-{i}", input=t) for i, t in enumerate(TEXTS)),
             _line("all", input=TEXTS), _line("short", input=TEXTS, dimensions=16),
             _line("packed", input=TEXTS, encoding_format="base64"), _line("ids", input=[ids]),
             _line("too-long", input=["fine", TOO_LONG])]
    jsonl = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = client.files.create(file=("embed.jsonl", io.BytesIO(jsonl)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                    in ("completed", "failed", "expired", "cancelled") and b, 180, 0.2, f"batch {batch.id}")
    assert done.status == "completed", done
    assert done.endpoint == "/v1/embeddings" and done.request_counts.completed == len(lines) - 1
    assert done.request_counts.failed == 1

    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    for line in out:
        check_output_line(line)
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines[:-1]]  # input order
    bodies = {o["custom_id"]: o["response"]["body"] for o in out}
    for i in range(len(TEXTS)):
        one = CreateEmbeddingResponse.model_validate(bodies[f"one-{i}"])
        assert one.model == "tiny-embed" and np.abs(_vectors(one)[0] - expected[i]).max() < 1e-5
    assert np.abs(_vectors(CreateEmbeddingResponse.model_validate(bodies["all"])) - expected).max() < 1e-5
    assert np.abs(_vectors(CreateEmbeddingResponse.model_validate(bodies["ids"]))[0] - expected[0]).max() < 1e-5
    short = _vectors(CreateEmbeddingResponse.model_validate(bodies["short"]))
    assert short.shape == (len(TEXTS), 16) and np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)
    packed = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in bodies["packed"]["data"]]
    assert np.abs(np.stack(packed) - expected).max() < 1e-5

    error = json.loads(client.files.content(done.error_file_id).text)
    refused = check_output_line(error).response  # the worker refused it: a 400 answer, as OpenAI's
    assert error["custom_id"] == "too-long" and refused is not None and refused.status_code == 400
    assert refused.body["error"]["code"] == "invalid_request" and refused.body["error"]["param"] == "body.input[1]"
    assert "reads at most 128 tokens" in refused.body["error"]["message"]


def test_synchronous_embeddings_create(client: openai.OpenAI, reference: Any) -> None:
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    # The openai package asks for base64 unless told otherwise, and decodes it to floats.
    default = client.embeddings.create(model="tiny-embed", input=TEXTS)
    assert isinstance(default, CreateEmbeddingResponse) and default.object == "list"
    assert [d.index for d in default.data] == list(range(len(TEXTS)))
    assert np.abs(_vectors(default) - expected).max() < 1e-5
    floats = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="float")
    assert np.array_equal(_vectors(floats), _vectors(default))
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    short = client.embeddings.create(model="tiny-embed", input="hello", dimensions=16, user="u-1")
    assert len(short.data[0].embedding) == 16

    with pytest.raises(openai.BadRequestError) as empty:  # refused by the API before it queues anything
        client.embeddings.create(model="tiny-embed", input=["a", ""])
    assert empty.value.body["param"] == "body.input[1]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:  # refused by the worker
        client.embeddings.create(model="tiny-embed", input=TOO_LONG)
    assert long.value.body["param"] == "body.input" and long.value.body["job_id"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as many:
        client.embeddings.create(model="tiny-embed", input=["x"] * 2049)
    assert many.value.body["param"] == "body.input"  # type: ignore[index]


def test_a_single_embedding_job(stack: Stack, embed_worker: subprocess.Popen[bytes], reference: Any) -> None:
    with stack.client() as c:
        job = c.post("/v1/jobs", json={"url": "/v1/embeddings", "custom_id": "single",
                                       "body": {"model": "tiny-embed", "input": TEXTS[1]}}).json()
        done = wait_for(lambda: (j := c.get(f"/v1/jobs/{job['id']}").json())["status"]
                        in ("succeeded", "failed", "cancelled") and j, 60, 0.1, "embedding job")
    assert done["status"] == "succeeded" and done["progress"] == 1.0, done
    result = CreateEmbeddingResponse.model_validate(done["result"])
    assert np.abs(_vectors(result)[0] - reference.encode([TEXTS[1]])[0]).max() < 1e-5
    listed = {m["id"]: m for m in httpx.get(f"{stack.base_url}/v1/models").json()["data"]}
    assert listed["tiny-embed"]["kind"] == "embedding" and listed["tiny-embed"]["queue"] == "genq.tiny-embed"
