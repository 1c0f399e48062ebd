"""Turning a stored job result into what a client receives.

Runners store image outputs as object keys. On every read the key becomes a fresh short-lived
presigned URL (S3), a URL of the API itself (file storage, served by `/v1/jobs/{id}/outputs/`),
or inline base64, as the request's `response_format` asked. What is stored for later reads (a
batch's output file) holds each image's API path instead, which never expires; the API renders
it afresh whenever the file is read.
"""

from __future__ import annotations

import base64
from typing import Any

from genq.shared.db import Job
from genq.shared.storage import PRESIGN_SECONDS, Storage


def output_path(job_id: str, key: str) -> str:
    """The API path of one stored output (`/v1/jobs/{job_id}/outputs/0.png`), authorised like the job."""
    return f"/v1/jobs/{job_id}/outputs/{key.rsplit('/', 1)[-1]}"


class ResultRenderer:
    """Renders results for one reader: `base_url` is the API's address as the client called it (for
    file storage's URLs); `stable` writes each image's API path in place of a URL, for results
    that are stored and rendered again when read."""

    def __init__(self, storage: Storage, base_url: str = "", expires_s: int = PRESIGN_SECONDS, *,
                 stable: bool = False) -> None:
        self.storage = storage
        self.base_url = base_url.rstrip("/")
        self.expires_s = expires_s
        self.stable = stable

    def image_url(self, job_id: str, key: str) -> str:
        if self.stable:
            return output_path(job_id, key)
        return self.storage.presigned_url(key, self.expires_s) or self.base_url + output_path(job_id, key)

    def render(self, job: Job) -> dict[str, Any] | None:
        result = job.result
        if not result or "output_keys" not in result:
            return as_requested(job, result)
        as_b64 = (job.body or {}).get("response_format") == "b64_json"
        data = []
        for item, key in zip(result["data"], result["output_keys"], strict=True):
            item = dict(item)
            if as_b64:
                item["b64_json"] = base64.b64encode(self.storage.get(key)).decode()
            else:
                item["url"] = self.image_url(job.id, key)
            data.append(item)
        return as_requested(job, {**(public_result(result) or {}), "data": data})


def public_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored result without its storage keys (webhook payloads, which carry no image URLs:
    receivers GET the job for fresh ones)."""
    if not result or "output_keys" not in result:
        return result
    return {k: v for k, v in result.items() if k != "output_keys"}


def requested_model(job: Job) -> str:
    """The model name the job's request used, which the job and its answers show: a fine-tuned
    model's name, where the job runs on its base model (`job.model`, the routing column)."""
    return job.requested_model or job.model


def as_requested(job: Job, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """`result` naming the model its request named, as OpenAI's answers for a fine-tuned model do
    (the worker wrote the base model it ran). Rewritten when read, so what is stored stays the
    worker's own."""
    if not result or job.requested_model is None or "model" not in result:
        return result
    return {**result, "model": job.requested_model}


def stored_result(job: Job) -> dict[str, Any] | None:
    """The job's stored result as readers without image URLs see it (webhook payloads, the job
    object): no storage keys, the requested model's name."""
    return as_requested(job, public_result(job.result))
