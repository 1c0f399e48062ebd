"""Shared fixtures: real services for integration tests (a throwaway Postgres database, a private
Redis, an S3 endpoint over HTTP served by moto, genq API and worker processes). The helpers they
use live in tests/support/."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.processes import Stack, die_with_parent, free_port
from tests.support.servers import PrivateRedis, throwaway_database
from tests.support.waiting import wait_for

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database for this test session, dropped at the end."""
    with throwaway_database(f"genq_test_{uuid.uuid4().hex[:10]}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server for this test session (the machine's shared Redis is left alone)."""
    server = PrivateRedis()
    server.start()
    yield server.url
    server.kill()


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
    chat_source = str((out / "tiny-chat").resolve())
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
runner = "tests.support.runners:RecordingEchoRunner"
delay_s = 4.0

[models.paced-echo]
kind = "echo"
source = "none"
delay_s = 0.3

[models.stream-echo]
kind = "echo"
source = "none"
delay_s = 6.0

[models.prio-echo]
kind = "echo"
source = "none"

[models.fault-echo]
kind = "echo"
source = "none"
runner = "tests.support.runners:RecordingEchoRunner"
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

# Fine-tuning tests: ft-chat is trained by the workers those tests start; no worker serves
# ft-queue-chat, so its training tasks stay on the queue to be read.
[models.ft-chat]
kind = "text"
source = "{chat_source}"

[models.ft-queue-chat]
kind = "text"
source = "{chat_source}"
""")
    return registry


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack_env(pg_url: str, redis_url: str, s3_endpoint: str, tiny_registry: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        GENQ_DATABASE_URL=pg_url, GENQ_BROKER_URL=redis_url, GENQ_STORAGE_URL="s3://genq-test/out",
        GENQ_S3_ENDPOINT=s3_endpoint, GENQ_S3_ACCESS_KEY="testing", GENQ_S3_SECRET_KEY="testing",
        GENQ_S3_SECURE="false", GENQ_MODELS_FILE=str(tiny_registry), PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        # The tests' webhook receivers listen on loopback, which webhooks reach only when allowed.
        GENQ_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8",
        # The test runners (tests/support/runners.py) that the test registry names.
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    return env


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API plus one worker for each of tiny-gpt2, tiny-chat, tiny-sd, tiny-gan and echo, shared by the
    integration tests."""
    s = Stack(stack_env, tmp_path_factory.mktemp("stack-logs"))
    try:
        s.start_api()
        models = ("tiny-gpt2", "tiny-chat", "tiny-sd", "tiny-gan", "echo")
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
