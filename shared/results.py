"""Turning a stored job result into what a client receives.

Runners store image outputs as object keys. On every read the key becomes a fresh short-lived
presigned URL (S3), a URL of the API itself (file storage, served by `/v1/jobs/{id}/outputs/`),
or inline base64, as the request's `response_format` asked.
"""

from __future__ import annotations

import base64
from typing import Any

from genq.shared.db import Job
from genq.shared.storage import PRESIGN_SECONDS, Storage


class ResultRenderer:
    def __init__(self, storage: Storage, base_url: str = "", expires_s: int = PRESIGN_SECONDS) -> None:
        self.storage = storage
        self.base_url = base_url.rstrip("/")
        self.expires_s = expires_s

    def render(self, job: Job) -> dict[str, Any] | None:
        result = job.result
        if not result or "output_keys" not in result:
            return result
        as_b64 = (job.body or {}).get("response_format") == "b64_json"
        data = []
        for item, key in zip(result["data"], result["output_keys"], strict=True):
            item = dict(item)
            if as_b64:
                item["b64_json"] = base64.b64encode(self.storage.get(key)).decode()
            else:
                name = key.rsplit("/", 1)[-1]
                item["url"] = (self.storage.presigned_url(key, self.expires_s)
                               or f"{self.base_url}/v1/jobs/{job.id}/outputs/{name}")
            data.append(item)
        return {**(public_result(result) or {}), "data": data}


def public_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored result without its storage keys (webhook payloads, which carry no image URLs:
    receivers GET the job for fresh ones)."""
    if not result or "output_keys" not in result:
        return result
    return {k: v for k, v in result.items() if k != "output_keys"}
