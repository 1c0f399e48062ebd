"""A small HTTP client for the genq API, used by the CLI. It raises `GenqError`; only the CLI turns
that into a command-line error."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from genq.sse import iter_events

TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")
# The server sends a keepalive comment after ~15 s of silence; a read quiet for this long is a dead link.
STREAM_READ_TIMEOUT_S = 45.0


class ClientSettings(BaseSettings):
    """Where the client finds the API, from `GENQ_API_URL` and `GENQ_API_KEY`."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore", frozen=True)

    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None


class GenqError(Exception):
    """The API refused a request (`status` and `code` from its error object), or could not be
    followed; `message` says which request and why."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class EventStreamError(GenqError):
    """A batch's event stream could not be followed to its end."""


class EventsUnavailable(EventStreamError):
    """The events endpoint answered 404 or 405: no such batch, or a server older than the endpoint."""


def _data(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"data": text}
    return value if isinstance(value, dict) else {"data": value}


class Client:
    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None, *, api_url: str | None = None) -> Client:
        """A client for `api_url`, or the settings' (GENQ_API_URL), with the settings' API key."""
        settings = settings or ClientSettings()
        return cls(api_url or settings.api_url, settings.api_key)

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.timeout = timeout

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            code = None
            try:
                error = resp.json()["error"]
                message, code = error["message"], error.get("code")
            except (ValueError, KeyError, TypeError):
                message = resp.text[:500]
            raise GenqError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {message}",
                            status=resp.status_code, code=code)
        return resp

    def _path(self, ident: str) -> str:
        if ident.startswith("batch_"):
            return f"/v1/batches/{ident}"
        if ident.startswith("job_"):
            return f"/v1/jobs/{ident}"
        raise GenqError(f"{ident!r} is neither a batch id (batch_...) nor a job id (job_...)")

    def submit_file(self, path: Path) -> dict[str, Any]:
        return self._check(self.http.post("/v1/batches", content=path.read_bytes(),
                                          headers={"Content-Type": "application/x-ndjson"})).json()

    def get(self, ident: str) -> dict[str, Any]:
        return self._check(self.http.get(self._path(ident))).json()

    def cancel(self, ident: str) -> dict[str, Any]:
        return self._check(self.http.post(self._path(ident) + "/cancel")).json()

    def results(self, batch_id: str) -> bytes:
        return self._check(self.http.get(f"/v1/batches/{batch_id}/results")).content

    def create_adapter(self, name: str, model: str, path: Path) -> dict[str, Any]:
        """Upload a LoRA adapter: `path` is its directory (packed here as tar.gz) or an archive."""
        if path.is_dir():
            data, filename = archive_adapter(path, "tar.gz"), f"{path.name}.tar.gz"
        else:
            data, filename = path.read_bytes(), path.name
        files = {"file": (filename, data, "application/octet-stream")}
        return self._check(self.http.post("/v1/adapters", data={"name": name, "model": model},
                                          files=files)).json()

    def list_adapters(self, model: str | None = None) -> list[dict[str, Any]]:
        params = {"model": model} if model else None
        return list(self._check(self.http.get("/v1/adapters", params=params)).json()["data"])

    def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/adapters/{adapter_id}")).json()

    def _stream_error(self, resp: httpx.Response) -> None:
        resp.read()
        try:
            self._check(resp)
        except GenqError as exc:
            kind = EventsUnavailable if resp.status_code in (404, 405) else EventStreamError
            raise kind(exc.message, status=exc.status, code=exc.code) from None

    def events(self, batch_id: str, *, keepalives: bool = False,
               retries: int = 1) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow a batch over Server-Sent Events: (event, data) pairs (`batch`, `counts`, `job`,
        and last `done`), plus ("keepalive", {}) on the server's idle comments if asked.

        A dropped connection is resumed with Last-Event-ID, up to `retries` times in a row without
        an event in between; the server then starts again with a `batch` snapshot, and `job` events
        already yielded are not repeated."""
        path = f"/v1/batches/{batch_id}/events"
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT_S))
        last_id: str | None = None
        seen: set[tuple[str, str]] = set()
        failures, pause_s = 0, 0.5
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                with self.http.stream("GET", path, headers=headers, timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        self._stream_error(resp)
                    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                        raise EventsUnavailable(f"GET {path}: not an event stream "
                                                f"({resp.headers.get('content-type')})")
                    for ev in iter_events(resp.iter_bytes(), comments=keepalives):
                        last_id = ev.id if ev.id is not None else last_id
                        pause_s = ev.retry_ms / 1000 if ev.retry_ms is not None else pause_s
                        if ev.event == "":
                            yield "keepalive", {}
                            continue
                        failures = 0
                        data = _data(ev.data)
                        if ev.event == "job":
                            key = (str(data.get("id")), str(data.get("status")))
                            if key in seen:
                                continue
                            seen.add(key)
                        yield ev.event, data
                        if ev.event == "done":
                            return
            except httpx.TransportError as exc:
                dropped = f"{type(exc).__name__}: {exc}"
            else:
                dropped = "the stream ended before `done`"
            failures += 1
            if failures > retries:
                raise EventStreamError(f"GET {path}: {dropped}")
            time.sleep(pause_s)

    def wait_batch(self, batch_id: str, *, progress: bool = False, poll_s: float = 0.5,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until the batch is terminal. With `progress`, a bar on stderr follows the server's
        event stream (polling instead on a server without one, or if the stream keeps dropping);
        there the timeout is checked on each event, at least every ~15 s."""
        from tqdm import tqdm

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch = self.get(batch_id)
        bar = tqdm(total=batch["request_counts"]["total"], unit="req", disable=not progress,
                   desc=batch_id[:18], dynamic_ncols=True)
        try:
            if progress and batch["status"] not in TERMINAL_BATCH:
                try:
                    return self._follow_events(batch, bar, deadline)
                except EventStreamError:
                    batch = self.get(batch_id)
            while True:
                _show(bar, batch["status"], batch["request_counts"])
                if batch["status"] in TERMINAL_BATCH:
                    return batch
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout_s}s")
                time.sleep(poll_s)
                batch = self.get(batch_id)
        finally:
            bar.close()

    def _follow_events(self, batch: dict[str, Any], bar: Any, deadline: float | None) -> dict[str, Any]:
        stream = self.events(batch["id"], keepalives=True)
        try:
            for event, data in stream:
                if event == "batch":
                    batch = data
                if event in ("batch", "counts"):
                    _show(bar, data["status"], data["request_counts"])
                elif event == "done":
                    return batch
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch['id']} still {batch['status']} when the wait ran out")
        finally:
            stream.close()
        raise EventStreamError(f"the event stream of {batch['id']} ended without `done`")


def _show(bar: Any, status: str, counts: dict[str, int]) -> None:
    bar.n = counts["completed"] + counts["failed"] + counts.get("cancelled", 0)
    bar.set_postfix_str(f"{status} ok={counts['completed']} failed={counts['failed']}", refresh=True)


def archive_adapter(directory: Path, fmt: str = "tar.gz") -> bytes:
    """Pack the regular files of `directory` (flat, sorted) into a tar.gz or zip archive."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    buf = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, arcname=path.name)
    elif fmt in ("tar.gz", "tgz", "tar"):
        with tarfile.open(fileobj=buf, mode="w:gz" if fmt != "tar" else "w") as tf:
            for path in files:
                tf.add(path, arcname=path.name, recursive=False)
    else:
        raise ValueError(f"unknown archive format {fmt!r}: use tar.gz, tar or zip")
    return buf.getvalue()
