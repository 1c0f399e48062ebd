"""The official `openai` package against genq, changing only base_url and api_key."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest

from tests.support.openai_shapes import check_output_line
from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _client(api: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return _client(stack)


@pytest.fixture(scope="module")
def short_urls(stack: Stack, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of our own whose presigned URLs live one second; the shared stack's workers run its jobs."""
    api = Stack({**stack_env, "GENQ_PRESIGN_SECONDS": "1"}, Path(tmp_path_factory.mktemp("short-urls")))
    try:
        api.start_api()
        yield api
    except BaseException:
        print(api.logs())
        raise
    finally:
        api.stop()


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _text_line(i: int, model: str = "tiny-gpt2") -> dict[str, Any]:
    return {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": f"Question {i}:", "max_tokens": 6, "temperature": 0}}


def _wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status
                    in ("completed", "failed", "expired", "cancelled") and b, timeout, 0.2, f"batch {batch_id}")


def test_openai_batch_script_runs_unchanged(client: openai.OpenAI) -> None:
    # What an existing OpenAI Batch script does, step by step.
    upload = client.files.create(file=("requests.jsonl", io.BytesIO(_jsonl([_text_line(i) for i in range(8)]))),
                                 purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0 and client.files.retrieve(upload.id).id == upload.id
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"description": "nightly eval"})
    assert batch.status in ("validating", "in_progress")
    done = _wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 8 and done.request_counts.completed == 8 and done.request_counts.failed == 0
    assert done.metadata == {"description": "nightly eval"} and done.input_file_id == upload.id
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    openai.types.Batch.model_validate(done.model_dump())  # every field of OpenAI's type, with its type
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [check_output_line(o).custom_id for o in out] == [f"q-{i}" for i in range(8)]
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["choices"] for o in out)
    assert any(b.id == batch.id for b in client.batches.list(limit=50).data)


def test_image_batch_and_error_file(client: openai.OpenAI) -> None:
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/images/generations",
              "body": {"model": "tiny-sd", "prompt": "a kite", "size": "32x32", "num_inference_steps": 2}},
             {"custom_id": "bad-label", "method": "POST", "url": "/v1/images/generations",
              "body": {"model": "tiny-gan", "prompt": "a unicorn", "size": "32x32"}}]
    upload = client.files.create(file=("img.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    done = _wait_batch(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/images/generations",
                                                     completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.completed == 1 and done.request_counts.failed == 1
    ok = json.loads(client.files.content(done.output_file_id).text)
    assert httpx.get(ok["response"]["body"]["data"][0]["url"]).content.startswith(b"\x89PNG")
    check_output_line(ok)
    # A request the worker refused is an HTTP error answer in the error file, as OpenAI writes it.
    err = json.loads(client.files.content(done.error_file_id).text)
    check_output_line(err)
    assert err["custom_id"] == "bad-label" and err["error"] is None
    assert err["response"]["status_code"] == 400 and err["response"]["request_id"].startswith("job_")
    failure = err["response"]["body"]["error"]
    assert failure["type"] == "invalid_request_error" and failure["code"] == "invalid_request"
    assert failure["param"] == "body.prompt" and "unicorn" in failure["message"]


def test_invalid_input_file_fails_the_batch_naming_lines(client: openai.OpenAI) -> None:
    lines = [_text_line(0), {**_text_line(1), "custom_id": "q-0"}, _text_line(2, model="nope")]
    raw = _jsonl(lines) + b'{"custom_id": "q-3", "url": \n'
    upload = client.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch")
    done = _wait_batch(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                                     completion_window="24h").id)
    assert done.status == "failed" and done.failed_at
    got = [(e.line, e.param) for e in done.errors.data]
    assert got == [(2, "custom_id"), (3, "body.model"), (4, None)]
    assert done.request_counts.total == 0


def test_batch_cancel_through_the_sdk(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("idle.jsonl", io.BytesIO(_jsonl([_text_line(i, "tiny-gpt2-idle")
                                                                          for i in range(3)]))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "in_progress", 30)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    errors = [json.loads(x) for x in client.files.content(cancelled.error_file_id).text.splitlines()]
    assert [check_output_line(e).error.code for e in errors] == ["batch_cancelled"] * 3  # type: ignore[union-attr]
    assert all(e["response"] is None for e in errors)


def test_synchronous_completion_and_image(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny-gpt2", prompt="Hello there", max_tokens=5, temperature=0,
                                           seed=3)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 5
    again = client.completions.create(model="tiny-gpt2", prompt="Hello there", max_tokens=5, temperature=0, seed=3)
    assert again.choices[0].text == completion.choices[0].text
    image = client.images.generate(model="tiny-sd", prompt="a lamp", size="32x32",  # type: ignore[arg-type]
                                   extra_body={"num_inference_steps": 2, "seed": 1})
    assert httpx.get(image.data[0].url).content.startswith(b"\x89PNG")
    b64 = client.images.generate(model="tiny-gan", prompt="car", size="32x32",  # type: ignore[arg-type]
                                 response_format="b64_json")
    assert b64.data[0].b64_json


def test_a_synchronous_request_a_worker_refuses_answers_as_its_output_line_would(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="tiny-gan", prompt="a unicorn", size="32x32")  # type: ignore[arg-type]
    assert refused.value.status_code == 400
    assert (refused.value.type, refused.value.code, refused.value.param) == (
        "invalid_request_error", "invalid_request", "body.prompt")
    assert str(refused.value.body["job_id"]).startswith("job_")  # type: ignore[index]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert {"tiny-gpt2", "tiny-sd", "tiny-gan", "echo"} <= set(listed)
    one = client.models.retrieve("tiny-gpt2")
    assert isinstance(one, openai.types.Model) and one == listed["tiny-gpt2"]
    openai.types.Model.model_validate(one.model_dump())  # id, object "model", created, owned_by
    assert (one.object, one.owned_by) == ("model", "genq")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert missing.value.type == "invalid_request_error"


def test_synchronous_call_with_no_worker_fails_clearly(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="tiny-gpt2-idle", prompt="anyone?", max_tokens=3,
                                  extra_query={"start_timeout": 1.5})
    assert exc.value.status_code == 503 and "no worker took the job" in str(exc.value)
    assert time.monotonic() - started < 15
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=5, temperature=9)
    assert bad.value.body["param"] == "body.temperature"  # type: ignore[index]


def _valid_until(url: str) -> float:
    """When a presigned URL stops working: its signing time plus its lifetime. (moto's S3 does not
    refuse an expired URL, so the tests read these instead of waiting for a 403.)"""
    query = parse_qs(urlsplit(url).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    return signed + int(query["X-Amz-Expires"][0])


def test_image_urls_in_an_output_file_outlive_the_presign_lifetime(short_urls: Stack) -> None:
    client = _client(short_urls)
    lines = [{"custom_id": f"img-{i}", "method": "POST", "url": "/v1/images/generations",
              "body": {"model": "tiny-gan", "prompt": "dog", "size": "32x32", "seed": i}} for i in range(2)]
    upload = client.files.create(file=("img.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    done = _wait_batch(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/images/generations",
                                                     completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.completed == 2, done

    def urls() -> list[tuple[str, str]]:
        out = [check_output_line(json.loads(x)) for x in client.files.content(done.output_file_id).text.splitlines()]
        return [(o.response.request_id, o.response.body["data"][0]["url"]) for o in out]  # type: ignore[union-attr]

    first = urls()
    assert all(parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["1"] for _, url in first)
    dead_at = max(_valid_until(url) for _, url in first)
    assert dead_at >= done.completed_at  # type: ignore[operator]
    wait_for(lambda: time.time() > dead_at + 1, 10, 0.2, "the first URLs to expire")
    later = urls()
    with httpx.Client(base_url=short_urls.base_url) as api:
        for job_id, url in later:
            # Signed at this read, after the first URLs died, and fetched as an OpenAI client
            # fetches an image: a plain GET without genq's Authorization header.
            assert _valid_until(url) > dead_at
            image = httpx.get(url)
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
            assert api.get(f"/v1/jobs/{job_id}/outputs/0.png").content == image.content
