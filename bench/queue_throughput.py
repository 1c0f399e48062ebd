"""Queue throughput: genq end to end against raw Celery, measured in one run on the same Redis.

Measured one after another on this machine:
  raw_celery    A bare Celery app (acks late, prefetch 1, JSON) and --workers `--pool solo` worker processes
                draining N no-op tasks (each INCRs a counter the parent polls): N / (first publish -> last done).
  genq_e2e      The genq API and --workers genq worker processes, each on its defaults, for the instant
                `echo` runner (Postgres, file storage).
                N requests go in as one NDJSON batch: accept_s is the POST's round trip; jobs_per_s is
                N / (POST -> batch `completed`), as raw_celery's clock starts at its first publish:
                accepting, claiming, running, storing, recording, finalizing. Workers start on the
                jobs while the API still publishes, so a clock started at the 202 would leave out
                the work done meanwhile (drain_s, 202 -> `completed`, is reported too).
  batch_accept  The POST of a --batch-lines batch to a model no worker serves, until its 202
                (validation, bulk insert, one publish per job); the batch is then cancelled.

How to read it: ratio_genq_to_raw (genq jobs/s / raw tasks/s) is the share of the bare broker's
throughput that genq keeps after its per-job work. Rates depend on the machine and its load: compare
numbers only within one output.

With --profile FILE, py-spy records the (first) genq worker's threads holding the GIL (raw collapsed
stacks) from the batch's POST until it completed; `profile` in the output lists its hot spots.

Needs Redis (GENQ_BENCH_REDIS; flushes dbs 12 and 11, or GENQ_BENCH_REDIS_DBS=RAW,GENQ, and refuses
them while other clients use them) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped
at the end). Runs on one machine take turns on a file lock; exit status 75: waited too long for it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import (
    Procs,
    Profiler,
    check_redis_dbs_unused,
    drop_stale_databases,
    hot_spots,
    package_versions,
    print_result,
    server_versions,
    stack_env,
    start_api,
    take_turn,
    wait_for,
)

REDIS_HOST = os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("GENQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
RAW_DB, GENQ_DB = (int(d) for d in os.environ.get("GENQ_BENCH_REDIS_DBS", "12,11").split(","))
RAW_BROKER, GENQ_BROKER = f"{REDIS_HOST}/{RAW_DB}", f"{REDIS_HOST}/{GENQ_DB}"
LOCK_FILE = Path(tempfile.gettempdir()) / "genq-queue-throughput.lock"
RAW_QUEUE, RAW_TASK, DONE_KEY = "bench.raw", "bench.noop", "bench:done"
NDJSON = {"Content-Type": "application/x-ndjson"}

# `idle-echo` is served by no worker: batches sent to it are only accepted, never run.
REGISTRY_TOML = "".join(f'[models.{m}]\nkind = "echo"\nsource = "none"\n' for m in ("echo", "idle-echo"))


# --- 1. raw Celery ------------------------------------------------------------------------------

def raw_app() -> Celery:
    app = Celery("bench_raw", broker=RAW_BROKER, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_acks_late=True, worker_prefetch_multiplier=1, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)
    counter = redis.Redis.from_url(RAW_BROKER)

    @app.task(name=RAW_TASK)
    def noop() -> None:
        counter.incr(DONE_KEY)  # completion signal, polled by the parent

    return app


def wait_for_workers(app: Celery, workers: int, what: str) -> None:
    """Until `workers` workers answer a control ping (each is consuming by then)."""
    wait_for(lambda: len(app.control.ping(timeout=0.5)) >= workers, 60, what, 0.05)


def run_raw_worker(index: int) -> None:
    """Entry point of the raw worker subprocesses (this file with --raw-worker INDEX)."""
    raw_app().worker_main(["worker", "-Q", RAW_QUEUE, "--pool", "solo", "--concurrency", "1",
                           "--hostname", f"raw{index}@%h",
                           "--loglevel", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"])


def bench_raw(procs: Procs, n: int, workers: int) -> dict[str, Any]:
    r = redis.Redis.from_url(RAW_BROKER)
    r.flushdb()
    app = raw_app()
    for i in range(workers):
        procs.start(f"raw-worker-{i}", [__file__, "--raw-worker", str(i)])
    wait_for_workers(app, workers, "raw Celery workers")
    app.send_task(RAW_TASK, queue=RAW_QUEUE)  # probe: the workers are consuming once it is counted
    wait_for(lambda: r.get(DONE_KEY) == b"1", 60, "raw Celery worker", 0.005)
    r.delete(DONE_KEY)
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task(RAW_TASK, queue=RAW_QUEUE, producer=producer)
    published = time.perf_counter()
    wait_for(lambda: int(r.get(DONE_KEY) or 0) >= n, 300, f"{n} raw tasks", 0.005)
    seconds = time.perf_counter() - started
    return {"tasks": n, "publish_s": round(published - started, 3), "seconds": round(seconds, 3),
            "tasks_per_s": round(n / seconds, 1)}


# --- 2 and 3. genq ------------------------------------------------------------------------------

def ndjson(n: int, model: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                                "body": {"model": model, "prompt": f"hello {i}"}}).encode() + b"\n"
                    for i in range(n))


def start_genq(procs: Procs, tmp: Path, db_url: str, workers: int) -> httpx.Client:
    """The API and `workers` echo workers; returns a client once all consume and a probe job has
    gone through."""
    (tmp / "models.toml").write_text(REGISTRY_TOML)
    env = stack_env(db_url=db_url, broker_url=GENQ_BROKER, storage_url=f"file://{tmp / 'objects'}",
                    registry=tmp / "models.toml")
    redis.Redis.from_url(GENQ_BROKER).flushdb()
    client = start_api(procs, env)
    for i in range(workers):
        procs.start(f"worker-{i}", ["-m", "genq", "worker", "--models", "echo", "--log-level", "warning"], env)
    # genq's Redis transport separates binding fields with ':' (shared/broker.py): so must the pinger.
    pinger = Celery("bench_genq", broker=GENQ_BROKER, set_as_current=False)
    pinger.conf.broker_transport_options = {"sep": ":"}
    wait_for_workers(pinger, workers, "genq workers")
    probe = client.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": "echo", "prompt": "hi"}})
    probe.raise_for_status()
    wait_for(lambda: client.get(f"/v1/jobs/{probe.json()['id']}").json()["status"] == "succeeded",
             60, "genq worker (probe job)", 0.02)
    return client


def bench_genq(client: httpx.Client, n: int, profiler: Callable[[], Profiler] | None = None) -> dict[str, Any]:
    body = ndjson(n, "echo")
    profile = profiler() if profiler else None
    t0 = time.perf_counter()
    resp = client.post("/v1/batches", content=body, headers=NDJSON)
    accepted = time.perf_counter()
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]

    def completed() -> dict[str, Any] | None:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("failed", "cancelled", "expired"):
            raise RuntimeError(f"batch ended {batch['status']}: {batch['request_counts']}")
        return batch if batch["status"] == "completed" else None

    # Each poll costs the API and Postgres ~3 ms of CPU: poll gently so as not to slow the worker.
    batch = wait_for(completed, 600, f"batch of {n} echo jobs", 0.1)
    done = time.perf_counter()
    if profile is not None:
        profile.stop()
    assert batch["request_counts"]["completed"] == n, batch["request_counts"]
    return {"jobs": n, "accept_s": round(accepted - t0, 3), "drain_s": round(done - accepted, 3),
            "seconds": round(done - t0, 3), "jobs_per_s": round(n / (done - t0), 1)}


def bench_accept(client: httpx.Client, lines: int) -> dict[str, Any]:
    body = ndjson(lines, "idle-echo")
    t0 = time.perf_counter()
    resp = client.post("/v1/batches", content=body, headers=NDJSON)
    seconds = time.perf_counter() - t0
    assert resp.status_code == 202, resp.text
    client.post(f"/v1/batches/{resp.json()['id']}/cancel").raise_for_status()
    return {"lines": lines, "bytes": len(body), "seconds": round(seconds, 3),
            "lines_per_s": round(lines / seconds, 1)}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            **server_versions(REDIS_HOST, PG_ADMIN),
            **package_versions("celery", "kombu", "redis", "sqlalchemy", "fastapi", "uvicorn")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="tasks for raw Celery and jobs for genq")
    parser.add_argument("--batch-lines", type=int, default=10_000, help="lines in the acceptance batch")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, raw Celery's and genq's")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy raw output file: profile the first genq worker while the batch runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=600, help="seconds to wait for another run")
    parser.add_argument("--raw-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker is not None:
        return run_raw_worker(args.raw_worker)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    # Turn SIGTERM into SystemExit so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = take_turn(LOCK_FILE, args.lock_wait, "queue benchmark")
    check_redis_dbs_unused(REDIS_HOST, (RAW_DB, GENQ_DB), "GENQ_BENCH_REDIS_DBS")

    db_name = f"genq_qbench_{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    with tempfile.TemporaryDirectory(prefix="genq-qbench-") as tmpdir, \
            psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        drop_stale_databases(admin, "genq_qbench_")  # holding the lock: unused ones were left by a killed run
        admin.execute(f'CREATE DATABASE "{db_name}"')
        try:
            with procs:  # on an error, the logs' tails to stderr; then the processes are stopped
                result: dict[str, Any] = {"machine": machine(), "workers": args.workers,
                                          "raw_celery": bench_raw(procs, args.jobs, args.workers)}
                procs.stop_all()  # the raw workers must not compete for CPU with genq
                client = start_genq(procs, tmp, f"{base}/{db_name}", args.workers)
                profiler = None
                if args.profile is not None:
                    worker_pid = procs.procs["worker-0"].pid
                    profiler = lambda: Profiler(worker_pid, args.profile.resolve(), gil=True)  # noqa: E731
                result["genq_e2e"] = bench_genq(client, args.jobs, profiler)
                if args.profile is not None:
                    result["profile"] = hot_spots(args.profile)
                result["ratio_genq_to_raw"] = round(
                    result["genq_e2e"]["jobs_per_s"] / result["raw_celery"]["tasks_per_s"], 4)
                result["batch_accept"] = bench_accept(client, args.batch_lines)
                client.close()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            for url in (RAW_BROKER, GENQ_BROKER):
                redis.Redis.from_url(url).flushdb()
    lock.close()
    print_result(result, args.out)


if __name__ == "__main__":
    main()
