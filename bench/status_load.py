"""Status load: how much slower a status read gets while a batch drains under many polling clients, in one run.

What it measures, on this machine, against `genq api --workers --api-workers` and --workers
`genq worker --models echo` processes (the instant `echo` runner; Postgres, Redis, file storage):
  idle    A batch of --jobs echo jobs is submitted before any worker runs, so it stays queued. One
          probe client then reads GET /v1/batches/{id} --idle-reads times, one read every
          --probe-ms, timing each: the read on an idle stack.
  loaded  The workers start; once they have finished a first job, --clients clients (in a process
          of their own, on asyncio) each poll every --poll-ms, in turn GET /v1/jobs/{a job of the
          batch} and GET /v1/batches/{id}, while the same probe reads the batch as before, until
          the batch is completed.
  ratio   loaded p95 / idle p95 of the probe's GET /v1/batches/{id} (goal: at most 5). The load
          clients' own latencies (`clients_reads`) are reported too, with `cpu_share`, their
          process's CPU time over the loaded phase: near 1, the clients were CPU-bound themselves
          and their latencies include waiting for their own event loop.
With --profile FILE, py-spy records the API processes' threads holding the GIL (raw collapsed stacks) through the
loaded phase and `profile` lists its hottest frames.

Rates depend on the machine and its load (2 cores run the API, the workers, Postgres, Redis and the
clients together): compare numbers only within one output.

Run: .venv/bin/python bench/status_load.py [--jobs N] [--clients N] [--api-workers N] [--out FILE]
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_STATUS_REDIS_DB, default 4, and refuses it while
other clients use it) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the end).
Runs on one machine take turns on a file lock; exit status 75: waited too long for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import (
    NDJSON,
    Procs,
    Profiler,
    check_redis_dbs_unused,
    drop_stale_databases,
    free_port,
    hot_spots,
    latency_stats,
    package_versions,
    print_result,
    server_versions,
    take_turn,
    wait_for,
)

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = int(os.environ.get("GENQ_BENCH_STATUS_REDIS_DB", "4"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
LOCK_FILE = Path(tempfile.gettempdir()) / "genq-status-load.lock"
DB_PREFIX = "genq_statusbench_"
MODEL, ENDPOINT = "echo", "/v1/completions"
REGISTRY_TOML = f'[models.{MODEL}]\nkind = "echo"\nsource = "none"\n'
GOAL_RATIO = 5.0


def start_api(procs: Procs, tmp: Path, db_url: str, api_workers: int) -> tuple[httpx.Client, dict[str, str]]:
    """`genq api --workers N` on a free port, no genq worker yet; a client once /readyz answers."""
    (tmp / "models.toml").write_text(REGISTRY_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_DATABASE_URL=db_url, GENQ_BROKER_URL=BROKER, PYTHONUNBUFFERED="1",
               GENQ_STORAGE_URL=f"file://{tmp / 'objects'}", GENQ_MODELS_FILE=str(tmp / "models.toml"))
    redis.Redis.from_url(BROKER).flushdb()
    port = free_port()
    several = ["--workers", str(api_workers)] if api_workers > 1 else []
    procs.start("api", ["-m", "genq", "api", "--port", str(port), *several, "--log-level", "warning"], env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def ready() -> bool:
        procs.check_alive()
        return client.get("/readyz").status_code == 200

    wait_for(ready, 90, "genq API /readyz", 0.05)
    return client, env


def submit_batch(client: httpx.Client, jobs: int) -> tuple[str, list[str]]:
    """One NDJSON batch of `jobs` echo requests; its id and its jobs' ids."""
    lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT,
                                 "body": {"model": MODEL, "prompt": f"hello {i}"}}).encode() + b"\n"
                     for i in range(jobs))
    resp = client.post("/v1/batches", content=lines, headers=NDJSON)
    resp.raise_for_status()
    batch_id = resp.json()["id"]
    ids: list[str] = []
    after: str | None = None
    while True:
        page = client.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 1000, **({"after": after} if after else {})})
        page.raise_for_status()
        ids += [j["id"] for j in page.json()["data"]]
        if not page.json()["has_more"]:
            return batch_id, ids
        after = page.json()["last_id"]


def probe(client: httpx.Client, batch_id: str, period_s: float, *, reads: int | None = None,
          until_completed: bool = False, deadline: float) -> tuple[list[float], dict[str, Any]]:
    """Read the batch every `period_s`, timing each read: `reads` times, or until it is completed."""
    ms: list[float] = []
    batch: dict[str, Any] = {}
    next_at = time.perf_counter()
    while time.perf_counter() < deadline and (reads is None or len(ms) < reads):
        began = time.perf_counter()
        resp = client.get(f"/v1/batches/{batch_id}")
        ms.append((time.perf_counter() - began) * 1000)
        resp.raise_for_status()
        batch = resp.json()
        if until_completed and batch["status"] in ("completed", "failed", "cancelled", "expired"):
            break
        next_at += period_s
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return ms, batch


def _load(base_url: str, batch_id: str, job_ids: list[str], clients: int, period_s: float,
          ready: Any, stop: Any, out: Any) -> None:
    """The load clients' process: `clients` asyncio clients polling until `stop` is set; puts their
    read latencies (ms) by route, and the errors they met, on `out`."""

    async def run() -> dict[str, list[float]]:
        got: dict[str, list[float]] = {"job": [], "batch": [], "errors": []}
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:

            async def client(i: int) -> None:
                n = i
                await asyncio.sleep(period_s * i / clients)  # spread the clients over one period
                while not stop.is_set():
                    route = "job" if n % 2 == 0 else "batch"
                    path = f"/v1/jobs/{job_ids[(n * 7919) % len(job_ids)]}" if route == "job" else \
                        f"/v1/batches/{batch_id}"
                    began = time.perf_counter()
                    try:
                        resp = await http.get(path)
                    except httpx.TransportError as exc:  # counted, not fatal: the run goes on
                        got["errors"].append(f"{route}: {type(exc).__name__}")
                    else:
                        got[route].append((time.perf_counter() - began) * 1000)
                        if resp.status_code != 200:
                            got["errors"].append(f"{route}: HTTP {resp.status_code}")
                    n += 1
                    await asyncio.sleep(max(0.0, period_s - (time.perf_counter() - began)))

            ready.set()
            await asyncio.gather(*(client(i) for i in range(clients)))
        return got

    got: dict[str, Any] = asyncio.run(run())
    got["cpu_s"] = time.process_time()  # this process's CPU time: near the wall time, the clients were CPU-bound
    out.put(got)


def measure(procs: Procs, tmp: Path, db_url: str, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + args.max_seconds
    client, env = start_api(procs, tmp, db_url, args.api_workers)
    batch_id, job_ids = submit_batch(client, args.jobs)
    probe_s = args.probe_ms / 1000
    probe(client, batch_id, probe_s, reads=20, deadline=deadline)  # warm the API processes' connections
    idle_ms, _ = probe(client, batch_id, probe_s, reads=args.idle_reads, deadline=deadline)

    for i in range(args.workers):
        procs.start(f"worker-{i}", ["-m", "genq", "worker", "--models", MODEL, "--log-level", "warning"], env)

    def draining() -> bool:
        procs.check_alive()
        return client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] > 0

    wait_for(draining, 90, "the workers' first jobs", 0.1)
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    load = ctx.Process(target=_load, args=(str(client.base_url), batch_id, job_ids, args.clients,
                                           args.poll_ms / 1000, ready, stop, out), daemon=True)
    load.start()
    if not ready.wait(60):
        raise RuntimeError("the load clients did not start")
    profiler = None
    if args.profile is not None:
        profiler = Profiler(procs.procs["api"].pid, args.profile.resolve(), subprocesses=True, gil=True)
    began = time.perf_counter()
    try:
        loaded_ms, batch = probe(client, batch_id, probe_s, until_completed=True, deadline=deadline)
    finally:
        loaded_s = time.perf_counter() - began
        if profiler is not None:
            profiler.stop()
        stop.set()
    clients_ms = out.get(timeout=120)
    load.join(30)

    idle, loaded = latency_stats(idle_ms), latency_stats(loaded_ms)
    ratio = round(loaded["p95_ms"] / idle["p95_ms"], 2) if idle["p95_ms"] and loaded["p95_ms"] else None
    capped = batch.get("status") != "completed"
    result: dict[str, Any] = {
        "jobs": args.jobs, "workers": args.workers, "api_workers": args.api_workers, "clients": args.clients,
        "poll_ms": args.poll_ms, "probe_ms": args.probe_ms,
        "batch_read_idle": idle, "batch_read_loaded": loaded,
        "p95_ratio_loaded_to_idle": ratio, "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio is not None and ratio <= GOAL_RATIO and not capped,
        "clients_reads": {"job": latency_stats(clients_ms["job"]), "batch": latency_stats(clients_ms["batch"]),
                          "errors": len(clients_ms["errors"]), "errors_sample": clients_ms["errors"][:5],
                          # Near 1: the clients' process used a whole core, so their own latencies
                          # include waiting for their own event loop, not only for the API.
                          "cpu_share": round(clients_ms["cpu_s"] / loaded_s, 2)},
        "loaded_s": round(loaded_s, 2),
        "capped": capped, "progress": {"status": batch.get("status"), "request_counts": batch.get("request_counts")},
    }
    if args.profile is not None and args.profile.exists():
        result["profile"] = hot_spots(args.profile)
    client.close()
    return result


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(),
            **server_versions(REDIS_HOST, PG_ADMIN),
            **package_versions("sqlalchemy", "psycopg", "fastapi", "uvicorn", "anyio")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="echo jobs in the batch")
    parser.add_argument("--workers", type=int, default=2, help="echo worker processes")
    parser.add_argument("--api-workers", type=int, default=2, help="API processes (genq api --workers)")
    parser.add_argument("--clients", type=int, default=30, help="concurrent polling clients")
    parser.add_argument("--poll-ms", type=float, default=200, help="each client's period between reads")
    parser.add_argument("--probe-ms", type=float, default=50, help="the probe's period between batch reads")
    parser.add_argument("--idle-reads", type=int, default=200, help="probe reads on the idle stack")
    parser.add_argument("--max-seconds", type=float, default=600, help="cap on the whole run; then report progress")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy raw output file: profile the API processes through the loaded phase")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=600, help="seconds to wait for another run")
    args = parser.parse_args()
    if min(args.jobs, args.workers, args.api_workers, args.clients, args.idle_reads) < 1:
        parser.error("--jobs, --workers, --api-workers, --clients and --idle-reads must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup below still runs
    lock = take_turn(LOCK_FILE, args.lock_wait, "status load benchmark")
    check_redis_dbs_unused(REDIS_HOST, (REDIS_DB,), "GENQ_BENCH_STATUS_REDIS_DB")
    db_name = f"{DB_PREFIX}{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    with tempfile.TemporaryDirectory(prefix="genq-statusbench-") as tmpdir, \
            psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        drop_stale_databases(admin, DB_PREFIX)  # holding the lock: unused ones were left by a killed run
        admin.execute(f'CREATE DATABASE "{db_name}"')
        try:
            with Procs(Path(tmpdir)) as procs:  # on an error, the logs' tails to stderr; then stopped
                facts = machine()  # before anything of ours runs: the load average is the machine's own
                result = measure(procs, Path(tmpdir), f"{base}/{db_name}", args)
                result["machine"] = facts
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(BROKER).flushdb()
    lock.close()
    print_result(result, args.out)


if __name__ == "__main__":
    main()
