"""One client's body must not stall or bloat the API: a huge NDJSON batch is counted before it is
parsed and handled off the event loop (`/healthz` keeps answering), uploads over their cap are
refused while they arrive, and an adapter zip bomb is refused without being inflated into memory.

An API process of our own (no workers: its jobs stay queued) runs against the session's Postgres,
Redis and S3 endpoint; its memory is read from /proc."""

from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MAX_BODY_BYTES = 32 * 1024 * 1024  # GENQ_MAX_BODY_BYTES here: bodies and uploaded files
MIB = 1024 * 1024
IDLE = "tiny-gpt2-idle"  # served by no worker


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack({**stack_env, "GENQ_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}, tmp_path_factory.mktemp("hostile-api"))
    try:
        stack.start_api()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


# --- measuring the API process ------------------------------------------------------------------

def _status_kib(api: Stack, field: str) -> int:
    status = Path(f"/proc/{api.procs[0].pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


class PeakMemory:
    """The API's peak RSS during a `with` block, above its RSS at the start (Linux: clear_refs 5
    resets the peak)."""

    def __init__(self, api: Stack) -> None:
        self.api = api
        self.added_mib = 0.0

    def __enter__(self) -> PeakMemory:
        Path(f"/proc/{self.api.procs[0].pid}/clear_refs").write_text("5")
        self.start = _status_kib(self.api, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.added_mib = (_status_kib(self.api, "VmHWM") - self.start) / 1024


# Runs in a process of its own, so that the test process's own work (sending the body) is not timed.
PROBE = """
import select, sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=300) as c:
    while not select.select([sys.stdin], [], [], 0.02)[0]:  # paced; stdin closed means stop
        begin = time.monotonic()
        ok = c.get("/healthz").status_code == 200
        print(time.monotonic() - begin if ok else "inf", flush=True)
"""


class HealthProbe:
    """GET /healthz in a loop, from another process, while a `with` block runs; `worst` is the
    slowest answer in seconds (infinite for one that was not a 200), the measure of how long the
    API's event loop was held."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.times: list[float] = []

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.times.append(float(line))

    def __enter__(self) -> HealthProbe:
        self._proc = subprocess.Popen([sys.executable, "-c", PROBE, self.base_url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.times, 30, interval=0.01, what="the first /healthz probe")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(300)
        self._reader.join(30)

    @property
    def worst(self) -> float:
        return max(self.times)

    def summary(self) -> str:
        median = sorted(self.times)[len(self.times) // 2]
        return f"/healthz worst {self.worst * 1000:.0f} ms, median {median * 1000:.0f} ms over {len(self.times)} probes"


def _submit_ndjson(api: Stack, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=api.base_url, timeout=300) as c:
        return c.post("/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"})


def _line(i: int, prompt_chars: int) -> bytes:
    body = {"model": IDLE, "prompt": f"{i} " + "x" * prompt_chars, "max_tokens": 1}
    return json.dumps({"custom_id": f"r{i}", "url": "/v1/completions", "body": body}).encode() + b"\n"


# --- NDJSON batches -----------------------------------------------------------------------------

def test_a_body_of_too_many_lines_is_refused_before_parsing_and_healthz_keeps_answering(api: Stack) -> None:
    body = b"{}\n" * (5 * MIB // 3)  # 5 MB, 1.7 million lines: blocked /healthz for 14 s when parsed first
    with HealthProbe(api.base_url) as probe, PeakMemory(api) as memory:
        resp = _submit_ndjson(api, body)
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert err["code"] == "batch_too_large" and "at most 50000 lines" in err["message"]
    assert probe.worst < 1.0, f"/healthz took {probe.worst:.2f} s while the body was handled"
    assert memory.added_mib < 3 * len(body) / MIB + 16, f"the API grew {memory.added_mib:.0f} MiB"


def test_a_20mb_batch_is_validated_off_the_event_loop_in_bounded_memory(api: Stack) -> None:
    body = b"".join(_line(i, 10_000) for i in range(2_000))  # 20 MB, 2,000 lines
    with HealthProbe(api.base_url) as idle:
        wait_for(lambda: len(idle.times) >= 20, 30, what="20 probes of the idle API")
    with HealthProbe(api.base_url) as probe, PeakMemory(api) as memory:
        resp = _submit_ndjson(api, body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["request_counts"]["total"] == 2_000
    factor = memory.added_mib / (len(body) / MIB)
    print(f"idle: {idle.summary()}")
    print(f"20 MB NDJSON of 2,000 lines: {probe.summary()}; "
          f"API peak +{memory.added_mib:.0f} MiB = {factor:.1f}x the body")
    assert probe.worst < 1.0, f"/healthz took {probe.worst:.2f} s while the batch was validated"
    assert factor < 8, f"the API grew {memory.added_mib:.0f} MiB for a {len(body) / MIB:.0f} MiB body"


def test_a_bad_line_in_a_20mb_batch_is_named_without_stalling_healthz(api: Stack) -> None:
    lines = [_line(i, 360) for i in range(50_000)]  # 20 MB in the most lines a batch may hold
    lines[-1] = b'{"custom_id": "last", "url": "/v1/completions", "body": {"model": "nope", "prompt": "x"}}\n'
    body = b"".join(lines)
    with HealthProbe(api.base_url) as probe, PeakMemory(api) as memory:
        resp = _submit_ndjson(api, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["line"] == 50_000 and resp.json()["error"]["code"] == "model_not_found"
    factor = memory.added_mib / (len(body) / MIB)
    print(f"20 MB NDJSON of 50,000 lines: {probe.summary()}; API peak +{memory.added_mib:.0f} MiB = {factor:.1f}x")
    assert probe.worst < 1.0, f"/healthz took {probe.worst:.2f} s while the batch was validated"


def test_a_file_batch_of_too_many_lines_fails_without_parsing_them(api: Stack) -> None:
    body = b"{}\n" * (5 * MIB // 3)  # 1.7 million lines: parsing them first took ~14 s
    with httpx.Client(base_url=api.base_url, timeout=60) as c, HealthProbe(api.base_url) as probe:
        up = c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("many.jsonl", body)})
        assert up.status_code == 200, up.text
        begin = time.monotonic()
        batch = c.post("/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/completions"}).json()
        done = wait_for(lambda: (b := c.get(f"/v1/batches/{batch['id']}").json())["status"] != "validating" and b,
                        30, what="the file batch validated")
        took = time.monotonic() - begin
    assert done["status"] == "failed" and done["errors"]["data"][0]["code"] == "batch_too_large", done
    assert took < 5, f"validating took {took:.1f} s"
    assert probe.worst < 1.0, f"/healthz took {probe.worst:.2f} s while the file batch was validated"


# --- uploads over their cap ---------------------------------------------------------------------

def _raw_post(api: Stack, path: str, headers: dict[str, str], chunks: Iterator[bytes],
              timeout: float = 60) -> tuple[int, dict[str, object], int]:
    """POST over a bare socket, sending `chunks` only while the server has not answered: the
    status, the JSON answer, and how many body bytes went out before it came."""
    url = urlsplit(api.base_url)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": url.netloc, **headers}.items())
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2]), sent


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def _multipart(fields: dict[str, str], filename: str) -> tuple[bytes, bytes]:
    """The part headers (form fields, then the file's) and the closing boundary of a multipart body."""
    head = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    head += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


BOUNDARY = "genq-hostile-boundary"
UPLOADS = {"/v1/files": ({"purpose": "batch"}, "big.jsonl", MAX_BODY_BYTES),
           "/v1/adapters": ({"name": "big", "model": "tiny-gpt2"}, "big.zip", 1024 * MIB)}


@pytest.mark.parametrize("path", list(UPLOADS))
def test_an_upload_declaring_more_than_the_cap_is_refused_before_its_body_is_read(api: Stack, path: str) -> None:
    fields, filename, limit = UPLOADS[path]
    head, _tail = _multipart(fields, filename)
    declared = max(limit + MIB, 1024 * MIB)  # 1 GiB, or just over the adapters' 1 GiB cap
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(declared)}
    begin = time.monotonic()
    status, answer, sent = _raw_post(api, path, headers, iter([head, *[b"x" * MIB] * 8]), timeout=20)
    print(f"{path}: {declared / MIB:.0f} MiB declared: {status} after {time.monotonic() - begin:.2f} s, "
          f"{sent} bytes sent")
    assert status == 413 and answer["error"]["code"] == "file_too_large" and answer["error"]["param"] == "file"


def test_a_chunked_upload_is_cut_off_at_the_cap(api: Stack) -> None:
    fields, filename, limit = UPLOADS["/v1/files"]
    head, _tail = _multipart(fields, filename)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Transfer-Encoding": "chunked"}
    chunk = MIB

    def chunks() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(head), head)
        for _ in range(1024):  # up to 1 GiB
            yield b"%x\r\n%s\r\n" % (chunk, b"x" * chunk)

    begin = time.monotonic()
    with PeakMemory(api) as memory:
        status, answer, sent = _raw_post(api, "/v1/files", headers, chunks())
    print(f"/v1/files: 1 GiB chunked: {status} after {time.monotonic() - begin:.2f} s, {sent / MIB:.0f} MiB sent; "
          f"API peak +{memory.added_mib:.0f} MiB")
    assert status == 413 and answer["error"]["code"] == "file_too_large", answer
    assert sent < limit + 64 * MIB, f"the API read {sent / MIB:.0f} MiB before refusing a {limit / MIB:.0f} MiB cap"


# --- an adapter zip bomb ------------------------------------------------------------------------

def _zip_bomb(inflated: int) -> bytes:
    """A peft-shaped zip whose weights member is `inflated` zero bytes (512 MiB pack into ~509 KiB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "task_type": "CAUSAL_LM"}))
        with zf.open("adapter_model.safetensors", "w") as member:
            for _ in range(inflated // MIB):
                member.write(bytes(MIB))
    return buf.getvalue()


def test_an_adapter_zip_bomb_is_refused_without_inflating_it_into_memory(api: Stack) -> None:
    bomb = _zip_bomb(512 * MIB)  # under GENQ_MAX_ADAPTER_BYTES (1 GiB) unpacked, but a thousandfold inflation
    begin = time.monotonic()
    with PeakMemory(api) as memory, httpx.Client(base_url=api.base_url, timeout=120) as c:
        resp = c.post("/v1/adapters", data={"name": "bomb", "model": "tiny-gpt2"},
                      files={"file": ("bomb.zip", bomb, "application/zip")})
    print(f"adapter bomb ({len(bomb) / 1024:.0f} KiB -> 512 MiB): {resp.status_code} after "
          f"{time.monotonic() - begin:.2f} s; API peak +{memory.added_mib:.0f} MiB")
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_adapter" and err["param"] == "file" and "decompression bomb" in err["message"]
    assert memory.added_mib < 32, f"the API grew {memory.added_mib:.0f} MiB checking a {len(bomb) >> 10} KiB archive"
