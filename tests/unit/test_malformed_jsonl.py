"""The malformed JSONL corpus (tests/fuzz/malformed/) through the in-process API: inline as NDJSON,
as an uploaded input file, and line by line as single jobs. Never a 5xx; every problem is reported
with its exact 1-based line and, where there is one, its field; nothing is recorded for a refused
batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from genq.shared.db import Batch, Job
from tests.fuzz.malformed_corpus import BOM, CORPUS, Case, cases
from tests.support.app import api_client

CASES = cases()
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with api_client(tmp_path_factory.mktemp("malformed")) as c:
        yield c


def _counts(c: TestClient) -> tuple[int, int]:
    with c.app.state.genq.sessions() as s:  # type: ignore[attr-defined]
        return (s.scalar(select(func.count()).select_from(Job)) or 0,
                s.scalar(select(func.count()).select_from(Batch)) or 0)


def _check_errors(errors: list[dict[str, Any]], case: Case) -> None:
    """The reported problems are exactly the expected ones, in order, each message naming its line
    and field."""
    assert [(e["line"], e["param"]) for e in errors] == [(p.line, p.param) for p in case.problems], errors
    for err, want in zip(errors, case.problems, strict=True):
        assert err["code"] == want.code, err
        where = f"line {want.line}: " if want.line is not None else ""
        assert err["message"].startswith(where + (f"{want.param}: " if want.param else "")), err
        assert want.words in err["message"], (want.words, err)


def test_corpus_files_match_the_generator() -> None:
    names = {p.name for p in CORPUS.glob("*.jsonl")}
    assert names == {f"{c.name}.jsonl" for c in CASES}, "regenerate: python -m tests.fuzz.malformed_corpus"
    for case in CASES:
        assert (CORPUS / f"{case.name}.jsonl").read_bytes() == case.data(), case.name


def test_corpus_covers_the_issue() -> None:
    kinds = {c.name for c in CASES}
    assert {"truncated", "wrong_types_text", "wrong_types_image", "huge_numbers", "deep_nesting", "invalid_utf8",
            "duplicate_custom_id", "empty_lines", "bom", "not_objects", "nan_infinity", "long_strings"} <= kinds
    assert any(b"[" * 100_000 in line for c in CASES for line in c.lines)
    assert sum(len(c.problems) for c in CASES) >= 90


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inline_ndjson_batch(client: TestClient, case: Case) -> None:
    before = _counts(client)
    resp = client.post("/v1/batches", content=case.data(), headers=NDJSON)
    assert resp.status_code < 500, resp.text
    if not case.problems:
        assert resp.status_code == 202, resp.text
        assert resp.json()["request_counts"]["total"] == sum(1 for line in case.lines if line.strip())
        return
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    _check_errors(err["errors"], case)
    first = case.problems[0]
    assert (err["line"], err["param"], err["code"]) == (first.line, first.param, first.code)
    assert _counts(client) == before, "a refused batch recorded something"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_uploaded_file_batch(client: TestClient, case: Case) -> None:
    upload = client.post("/v1/files", files={"file": (f"{case.name}.jsonl", case.data(), "application/jsonl")},
                         data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    jobs_before = _counts(client)[0]
    created = client.post("/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": case.endpoint})
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "validating"
    batch = client.get(f"/v1/batches/{created.json()['id']}")  # validation ran in the background
    assert batch.status_code == 200, batch.text
    body = batch.json()
    if not case.problems:
        assert body["status"] == "in_progress", body
        return
    assert body["status"] == "failed", body
    assert body["errors"]["object"] == "list"
    _check_errors(body["errors"]["data"], case)
    assert _counts(client)[0] == jobs_before, "a batch that failed validation recorded jobs"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_line_as_a_single_job(client: TestClient, case: Case) -> None:
    """Lines posted alone to /v1/jobs: the same field is named (batch-only rules aside)."""
    for number, line in enumerate(case.lines, start=1):
        if not line.strip() or line.startswith(BOM):  # a body's leading byte order mark is ignored
            continue
        before = _counts(client)
        resp = client.post("/v1/jobs", content=line, headers={"Content-Type": "application/json"})
        assert resp.status_code < 500, (number, resp.text)
        problems = [p for p in case.problems if p.line == number and not p.batch_only]
        if not problems:
            assert resp.status_code == 202, (number, resp.text)
            continue
        assert resp.status_code == 400, (number, resp.text)
        err = resp.json()["error"]
        assert (err["param"], err["code"]) == (problems[0].param, problems[0].code), (number, err)
        assert problems[0].words in err["message"], (number, err)
        assert _counts(client) == before


MULTIPART = "multipart/form-data; boundary=xyz"


def _multipart(filename: bytes) -> bytes:
    """An upload whose filename holds exactly these bytes (HTTP clients would escape a NUL)."""
    return (b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n{}\n\r\n--xyz--\r\n")


def test_nul_characters_are_refused_naming_the_parameter(client: TestClient) -> None:
    """PostgreSQL text cannot hold NUL: refused up front with a 400 naming the parameter, never a 500."""
    cases = [
        (client.get("/v1/batches", params={"after": "batch_\x00"}), "after"),
        (client.get("/v1/files", params={"purpose": "batch\x00"}), "purpose"),
        (client.get("/v1/jobs/job_%00x"), "job_id"),
        (client.get("/v1/batches/batch_%00x/jobs"), "batch_id"),
        (client.get("/v1/webhooks/deliveries", params={"object_id": "\x00"}), "object_id"),
        (client.post("/v1/batches", json={"input_file_id": "file_\x00", "endpoint": "/v1/completions"}),
         "input_file_id"),
        (client.post("/v1/batches", json={"requests": [{"custom_id": "a", "url": "/v1/completions",
                                                        "body": {"model": "tiny-gpt2", "prompt": "x"}}],
                                          "webhook_url": "https://example.com/\x00"}), "webhook_url"),
        (client.post("/v1/files", content=_multipart(b"a\x00.jsonl"), headers={"Content-Type": MULTIPART}), "file"),
    ]
    for resp, param in cases:
        assert resp.status_code == 400, (param, resp.text)
        err = resp.json()["error"]
        assert err["param"] == param and "NUL" in err["message"], err


def test_synchronous_endpoints_name_the_body_field(client: TestClient) -> None:
    bad = [(b'{"model": "tiny-gpt2", "prompt": "x", "temperature": NaN}', "body.temperature"),
           (b'{"model": "tiny-gpt2", "prompt": "\\ud800"}', "body.prompt")]
    for raw, param in bad:
        resp = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param and resp.json()["error"]["code"] == "invalid_json"
