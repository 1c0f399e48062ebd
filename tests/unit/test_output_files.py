"""A batch's output file keeps working image URLs however late it is read: the stored file holds
each image's API path, and every read of its content renders fresh URLs (here on file storage,
where they are this API's own; tests/integration/test_openai_sdk.py checks S3's presigned ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from genq.services.output_files import render_output_file
from genq.shared import jobs as jd
from genq.shared.db import File, Job, session_scope
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.results import ResultRenderer
from tests.support.app import api_client
from tests.support.openai_shapes import check_output_line

PNG = b"\x89PNG\r\n\x1a\n-not-really-an-image"


def _image_line(cid: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "url": "/v1/images/generations",
            "body": {"model": "tiny-gan", "prompt": "cat", "size": "32x32", **body}}


def _finished_batch(c: TestClient, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit a batch, then play the worker: store one PNG per job and record the result."""
    state = c.app.state.genq  # type: ignore[attr-defined]
    batch = c.post("/v1/batches", json={"requests": lines}).json()
    jobs = c.get(f"/v1/batches/{batch['id']}/jobs").json()["data"]
    for job in jobs:
        key = f"jobs/{job['id']}/1/0.png"
        state.storage.put(key, PNG, "image/png")
        result = {"created": 1, "data": [{"seed": 1, "index": 0, "revised_prompt": None}], "output_keys": [key]}
        with session_scope(state.sessions) as s:
            assert jd.claim_job(s, job["id"], worker="w", lease_s=30)
            assert jd.finish_job(s, job["id"], worker="w", status="succeeded", result=result)
    assert maybe_finalize_batch(state.sessions, state.storage, batch["id"]) == "completed"
    return c.get(f"/v1/batches/{batch['id']}").json()


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines()]


def test_the_stored_file_holds_api_paths_and_each_read_renders_absolute_urls(tmp_path: Path) -> None:
    with api_client(tmp_path) as c:
        batch = _finished_batch(c, [_image_line("a"), _image_line("b64", response_format="b64_json")])
        state = c.app.state.genq  # type: ignore[attr-defined]
        with state.sessions() as s:
            stored = _lines(state.storage.get(s.get(File, batch["output_file_id"]).key).decode())
        content = c.get(f"/v1/files/{batch['output_file_id']}/content")
        served = _lines(content.text)
        image = c.get(served[0]["response"]["body"]["data"][0]["url"])
    job_id = stored[0]["response"]["request_id"]
    assert stored[0]["response"]["body"]["data"][0]["url"] == f"/v1/jobs/{job_id}/outputs/0.png"
    assert content.status_code == 200 and content.headers["content-type"] == "application/jsonl"
    for line in served:
        check_output_line(line)
    assert served[0]["response"]["body"]["data"][0]["url"] == f"http://testserver/v1/jobs/{job_id}/outputs/0.png"
    assert image.status_code == 200 and image.content == PNG
    # A b64_json image is inline: served exactly as stored.
    assert served[1] == stored[1] and served[1]["response"]["body"]["data"][0]["b64_json"]


def test_only_files_genq_wrote_from_the_tenants_own_jobs_are_rendered(tmp_path: Path) -> None:
    with api_client(tmp_path) as c:
        batch = _finished_batch(c, [_image_line("a")])
        state = c.app.state.genq  # type: ignore[attr-defined]
        output = c.get(f"/v1/files/{batch['output_file_id']}/content").text
        # An uploaded file that copies the line is served as uploaded, URL and all.
        forged = output.replace("http://testserver", "")
        upload = c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("x.jsonl", forged.encode())}).json()
        assert c.get(f"/v1/files/{upload['id']}/content").text == forged
        with state.sessions() as s:
            row = s.get(File, batch["output_file_id"])
            data = state.storage.get(row.key)
            renderer = ResultRenderer(state.storage, "http://api")
            assert b"http://api/v1/jobs/" in render_output_file(s, renderer, row, data)
            # The same file, as if another tenant's: its lines name jobs that tenant does not own.
            s.expunge(row)
            row.tenant = "someone-else"
            assert render_output_file(s, renderer, row, data) == data
            assert s.get(Job, _lines(data.decode())[0]["response"]["request_id"]).tenant is None
