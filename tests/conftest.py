"""Shared fixtures: real services for integration tests (Postgres, Redis, an S3 endpoint over HTTP
served by moto, genq API and worker processes) and a condition-waiting helper."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("GENQ_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("GENQ_TEST_REDIS", "redis://127.0.0.1:6379/13")


def wait_for(pred: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> T:
    """Poll `pred` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling through transient errors
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                             if last_exc else ""))


def die_with_parent() -> None:
    """In a child before exec: have the kernel SIGTERM it if pytest dies, even by SIGKILL (Linux)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_database(name: str) -> Iterator[str]:
    """Create Postgres database `name` on the test server; yield its SQLAlchemy URL; drop it after."""
    import psycopg

    from genq.shared.db import engine_for

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_benchmark(cmd: list[str], out: Path, timeout_s: float, busy: str) -> dict[str, Any]:
    """Run a bench/ script as a user would; return its JSON (checked against --out). Skips when
    another run holds the benchmark's lock (exit 75)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM, not SIGKILL: the benchmark then stops its processes and drops its database
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"benchmark took over {timeout_s:g}s:\n{stderr[-4000:]}")
    if proc.returncode == 75:
        pytest.skip(busy)
    assert proc.returncode == 0, stderr[-4000:]
    result: dict[str, Any] = json.loads(stdout)
    assert result == json.loads(out.read_text())
    return result


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database for this test session, dropped at the end."""
    with throwaway_database(f"genq_test_{uuid.uuid4().hex[:10]}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint over HTTP on loopback (moto's server), for the `minio` client."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    endpoint = f"127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"http://{endpoint}/", timeout=1).status_code < 500, 30, what="moto_server")
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight models plus a registry with extra test-only models."""
    from genq.workers.tiny import build_tiny

    out = tmp_path_factory.mktemp("models")
    registry = build_tiny(out)
    source = str((out / "tiny-gpt2").resolve())
    registry.write_text(registry.read_text() + f"""
[models.tiny-gpt2-idle]
kind = "text"
source = "{source}"

[models.echo]
kind = "echo"
source = "none"

[models.slow-echo]
kind = "echo"
source = "none"
delay_s = 4.0

[models.paced-echo]
kind = "echo"
source = "none"
delay_s = 0.3

[models.prio-echo]
kind = "echo"
source = "none"

[models.fault-echo]
kind = "echo"
source = "none"
delay_s = 0.05

[models.poison-echo]
kind = "echo"
source = "none"
delay_s = 0.05
runner = "tests.support.runners:PoisonEchoRunner"

[models.batch-echo]
kind = "echo"
source = "none"
batch = true
max_batch_size = 8
max_wait_ms = 300
delay_s = 1.0
runner = "tests.support.runners:FailingBatchEchoRunner"

[models.lru-a]
kind = "text"
source = "{source}"

[models.lru-b]
kind = "text"
source = "{source}"
""")
    return registry


class Stack:
    """genq API and worker processes against real Postgres, Redis and S3."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.base_url = ""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "genq", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        port = free_port()
        self._spawn("api", ["api", "--port", str(port), "--log-level", "warning"])
        self.base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(self.base_url + "/readyz", timeout=5).status_code == 200, 60, what="API ready")

    def start_worker(self, models: str, *extra: str, name: str | None = None) -> subprocess.Popen[bytes]:
        proc = self._spawn(name or f"worker-{models}-{len(self.procs)}",
                           ["worker", "--models", models, "--log-level", "info", *extra])
        return proc

    def wait_worker_ready(self, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
        log = self.logdir / f"{name}.log"
        wait_for(lambda: proc.poll() is None and b"ready." in log.read_bytes(), timeout, what=f"{name} ready")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.logdir.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack_env(pg_url: str, redis_url: str, s3_endpoint: str, tiny_registry: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        GENQ_DATABASE_URL=pg_url, GENQ_BROKER_URL=redis_url, GENQ_STORAGE_URL="s3://genq-test/out",
        GENQ_S3_ENDPOINT=s3_endpoint, GENQ_S3_ACCESS_KEY="testing", GENQ_S3_SECRET_KEY="testing",
        GENQ_S3_SECURE="false", GENQ_MODELS_FILE=str(tiny_registry), PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        # The test runners (tests/support/runners.py) that the test registry names.
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    return env


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API plus one worker for each of tiny-gpt2, tiny-sd, tiny-gan and echo, shared by the
    integration tests."""
    s = Stack(stack_env, tmp_path_factory.mktemp("stack-logs"))
    try:
        s.start_api()
        models = ("tiny-gpt2", "tiny-sd", "tiny-gan", "echo")
        workers = {m: s.start_worker(m, name=f"worker-{m}") for m in models}
        for model, proc in workers.items():
            s.wait_worker_ready(proc, f"worker-{model}")
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.stop()


@pytest.fixture()
def settings_for(stack_env: dict[str, str]) -> Callable[..., Any]:
    """Build genq Settings for the integration services (used to read storage and the DB directly)."""
    from genq.shared.config import build_settings

    def make(**overrides: Any) -> Any:
        values = {k.removeprefix("GENQ_").lower(): v for k, v in stack_env.items() if k.startswith("GENQ_")}
        values.update(overrides)
        return build_settings(**values)

    return make
