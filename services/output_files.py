"""Batch output files served with fresh image URLs.

A batch's output file is written once, when the batch ends, with each image's API path in place
of a URL (genq.shared.results). A presigned URL written then would die an hour later, so every
read of the file renders its image lines again from their jobs, as `GET /v1/batches/{id}/results`
does: a presigned URL valid for GENQ_PRESIGN_SECONDS from this read (S3), or this API's own
absolute URL (file storage). Text lines and `b64_json` images are served as stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.shared.db import File as FileRow
from genq.shared.db import Job, owned_by
from genq.shared.finalize import OUTPUT_PURPOSE
from genq.shared.results import ResultRenderer

# Only an image line holds this (finalize writes compact JSON, and a quote inside a string value is
# escaped), so the other lines are passed through without being parsed.
_URL_FIELD = b'"url":"'
_CHUNK = 1000


def _image_lines(lines: list[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, raw in enumerate(lines):
        if _URL_FIELD not in raw:
            continue
        line = json.loads(raw)
        response = line.get("response") or {}
        if response.get("status_code") == 200 and isinstance(response.get("request_id"), str):
            yield index, line


def render_output_file(session: Session, renderer: ResultRenderer, row: FileRow, data: bytes) -> bytes:
    """The file's content as served now. Only files genq wrote are rendered, and only from the
    file's own tenant's jobs: an uploaded file naming someone else's job gets nothing from it."""
    if row.purpose != OUTPUT_PURPOSE:
        return data
    lines = data.splitlines(keepends=True)
    pending = dict(_image_lines(lines))
    by_job = {line["response"]["request_id"]: index for index, line in pending.items()}
    ids = list(by_job)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        jobs = session.execute(select(Job).where(Job.id.in_(chunk), owned_by(Job.tenant, row.tenant),
                                                 Job.status == "succeeded")).scalars()
        for job in jobs:
            index = by_job[job.id]
            line = pending[index]
            line["response"]["body"] = renderer.render(job)
            lines[index] = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    return b"".join(lines)
