"""Child processes of the tests: free ports, children that die with pytest, and the genq stack."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.waiting import wait_for


def die_with_parent() -> None:
    """In a child before exec: have the kernel SIGTERM it if pytest dies, even by SIGKILL (Linux)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
