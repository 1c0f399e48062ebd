"""Servers the tests own: a throwaway database on the machine's Postgres, and private redis-server,
Postgres clusters and moto S3 servers on free ports. Nothing here touches what the tests did not create."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.processes import die_with_parent, free_port
from tests.support.waiting import wait_for

PG_ADMIN = os.environ.get("GENQ_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BIN = Path(os.environ.get("GENQ_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


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


class PrivateRedis:
    """A throwaway redis-server without persistence: a restart loses every message, as a real
    crash of an in-memory broker would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        wait_for(self.ping, 10, 0.05, "private redis up")

    def ping(self) -> bool:
        import redis

        return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


class PrivatePostgres:
    """A throwaway cluster (trust auth, fsync off). initdb refuses to run as root, so as root it
    runs as the `postgres` user in a directory that user owns."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="genq-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str, check: bool = True) -> int:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], check=check, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE).returncode

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                  "-w", "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status", check=False) == 0

    def url(self, db: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{db}"


class PrivateMoto:
    """A moto S3 server of one test module on a port of its own. Its buckets live in memory, so a
    restart is "the bucket is gone"."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.logdir / "moto.log").open("ab")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        wait_for(lambda: httpx.get(f"http://{self.endpoint}/", timeout=1).status_code < 500, 30, what="moto up")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)
