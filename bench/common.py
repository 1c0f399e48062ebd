"""Helpers shared by the benchmark scripts in bench/ (queue_throughput, image_throughput, gpu_check).

The scripts are run as `python bench/X.py` (gpu_check.py through bench/gpu_check.sh) and put this
directory on sys.path before `from common import ...`. This module imports only the standard
library and httpx at load time; redis and psycopg only when server_versions() is called, so that
gpu_check.py, which needs no servers, does not need them either.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_for(pred: Callable[[], T | None], timeout: float, what: str,
             interval: float | Callable[[], float] = 0.05) -> T:
    """Poll `pred` until it returns something truthy, or fail naming `what`.

    `interval` is the pause between polls in seconds, or a function returning it (to poll more
    often near the end of a wait). Connection errors while a server starts count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := pred():
                return value
        except (httpx.TransportError, OSError):
            pass  # not listening yet
        time.sleep(interval() if callable(interval) else interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PR_SET_PDEATHSIG = 1
# Looked up here, in the parent, so that the child between fork and exec only makes the call.
# Elsewhere than Linux there is no prctl: stop_all (and gpu_check.sh's pid file) must do.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGTERM it if the benchmark dies, even by SIGKILL (Linux)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Procs:
    """Python subprocesses in their own process groups, each logging to `logdir/NAME.log`, started
    in ROOT and sent SIGTERM if this process dies (Linux); all stopped by stop_all. With `pidfile`,
    each one's id is appended there, so that a wrapper (gpu_check.sh) can still stop their process
    groups if this process is killed."""

    def __init__(self, logdir: Path, pidfile: Path | None = None, stop_timeout: float = 15) -> None:
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.pidfile = pidfile
        self.stop_timeout = stop_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run `python ARGS` as `name` (unique among the running ones); env None: this one's."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was already started")
        with (self.logdir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent if _prctl else None)
        self.procs[name] = proc
        if self.pidfile is not None:
            with self.pidfile.open("a") as f:
                f.write(f"{proc.pid}\n")
        return proc

    def check_alive(self) -> None:
        """Fail, with its log's tail, if any started process has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.tail(name)}")

    def stop_all(self) -> None:
        """SIGTERM every process group, then SIGKILL those still there after stop_timeout seconds."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Leaving `with procs:`: on any exception (SystemExit too) the logs' tails go to stderr; then
        stop_all. The exception, if any, goes on."""
        try:
            if exc_type is not None:
                print(self.tails(), file=sys.stderr)
        finally:
            self.stop_all()

    def tail(self, name: str, chars: int = 3000) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-chars:]

    def tails(self) -> str:
        """The end of every log in logdir, stopped processes' included."""
        return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.logdir.glob("*.log")))


def print_result(result: dict[str, Any], out: Path | None) -> None:
    """Print the benchmark's JSON result and, with `out`, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


# --- machine facts ---------------------------------------------------------------------------------

def server_versions(redis_url: str, pg_url: str) -> dict[str, Any]:
    """The versions of the Redis and Postgres servers the benchmark runs against."""
    import psycopg
    import redis

    with psycopg.connect(pg_url) as pg:
        pg_version = pg.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return {"redis_server": redis.Redis.from_url(redis_url).info("server")["redis_version"],
            "postgres_server": pg_version}


def package_versions(*packages: str) -> dict[str, str]:
    """Installed version of each distribution, in the order given."""
    return {pkg: version(pkg) for pkg in packages}


EX_TEMPFAIL = 75  # another run holds the lock for too long: try again later


def take_turn(lock_file: Path, wait_s: float, what: str) -> IO[str]:
    """Hold a machine-wide lock for this run (released when the process exits), so two runs of one
    benchmark never share its Redis db; exit 75 if another run holds it past `wait_s`."""
    fh = lock_file.open("w")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"another {what} run held {lock_file} for over {wait_s:.0f}s", file=sys.stderr)
                sys.exit(EX_TEMPFAIL)
            time.sleep(0.5)


def check_redis_dbs_unused(redis_url: str, dbs: tuple[int, ...], env_hint: str) -> None:
    """Refuse to flush Redis dbs that another client is using (e.g. a worker leaked by a killed run)."""
    import redis

    others = [c for c in redis.Redis.from_url(redis_url).client_list() if int(c["db"]) in dbs]
    if others:
        sys.exit(f"Redis db {' or '.join(map(str, dbs))} is in use by {len(others)} other client(s) "
                 f"({', '.join(sorted({c['addr'] for c in others}))}); stop them or set {env_hint}")
