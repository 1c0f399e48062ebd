"""A small HTTP client for the genq API, used by the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import httpx

TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:500]
            raise click.ClickException(f"{resp.request.method} {resp.request.url.path}: "
                                       f"{resp.status_code} {message}")
        return resp

    def _path(self, ident: str) -> str:
        if ident.startswith("batch_"):
            return f"/v1/batches/{ident}"
        if ident.startswith("job_"):
            return f"/v1/jobs/{ident}"
        raise click.ClickException(f"{ident!r} is neither a batch id (batch_...) nor a job id (job_...)")

    def submit_file(self, path: Path) -> dict[str, Any]:
        return self._check(self.http.post("/v1/batches", content=path.read_bytes(),
                                          headers={"Content-Type": "application/x-ndjson"})).json()

    def get(self, ident: str) -> dict[str, Any]:
        return self._check(self.http.get(self._path(ident))).json()

    def cancel(self, ident: str) -> dict[str, Any]:
        return self._check(self.http.post(self._path(ident) + "/cancel")).json()

    def results(self, batch_id: str) -> bytes:
        return self._check(self.http.get(f"/v1/batches/{batch_id}/results")).content

    def wait_batch(self, batch_id: str, *, progress: bool = False, poll_s: float = 0.5,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the batch is terminal, with a progress bar on stderr if asked."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch = self.get(batch_id)
        bar = tqdm(total=batch["request_counts"]["total"], unit="req", disable=not progress,
                   desc=batch_id[:18], dynamic_ncols=True)
        try:
            while True:
                c = batch["request_counts"]
                bar.n = c["completed"] + c["failed"] + c.get("cancelled", 0)
                bar.set_postfix_str(f"{batch['status']} ok={c['completed']} failed={c['failed']}", refresh=True)
                if batch["status"] in TERMINAL_BATCH:
                    return batch
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout_s}s")
                time.sleep(poll_s)
                batch = self.get(batch_id)
        finally:
            bar.close()
