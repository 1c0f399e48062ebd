"""Batch scale: a --lines-line OpenAI-style batch (uploaded file) validated, queued and drained, in one run.

What it measures, on this machine, against the genq API and --workers `genq worker --models echo`
processes (the instant `echo` runner; Postgres, Redis, file storage), after one warm-up job per worker:
  upload_s     POST /v1/files (multipart, purpose=batch) of the JSONL input file, until its answer.
  validated_s  POST /v1/batches {input_file_id} (answered `validating` at once) until a poll sees it
               `in_progress` with request_counts.total == lines: the file read, every line validated
               and every job inserted (one transaction).
  enqueued_s   POST /v1/batches until a poll sees every job published: jobs finished (Postgres, read
               first) + messages waiting in Redis (LLEN of `genq.echo` and its priority lists
               `genq.echo:1`..`:9`, read second) + messages taken but not acked (HLEN `unacked`:
               running or about to run) >= lines. A job acked between the two reads is missed (we
               then see it later), one finished but not yet acked counts twice: at most --workers
               extra, while publishes land 1,000 at a time. The goal is 30 s.
  poll         One client polls GET /v1/batches/{id} every --poll-ms from the POST on, timing each
               call. Every poll checks that request_counts add up (completed + failed + cancelled +
               running + queued == total) and that completed never decreases: count_violations must be
               0. `poll` gives the latencies of the polls from `in_progress` on, while the workers drain
               the batch at full speed (goal p95 < 50 ms); `poll_validating` those before it.
  drain        From the poll that first saw `in_progress` until the one that saw `completed`:
               jobs_per_s = completed jobs / seconds.
With --max-seconds (counted from the start of the run) the measurement stops where it got to:
`capped` is then true, `progress` tells how far it went and drain reports the jobs done so far.
With --profile FILE, py-spy records the API process (raw collapsed stacks) from the batch POST until
enqueued (or the cap) and `profile` lists its hottest frames.

Rates depend on the machine and its load (2 cores run the API, the workers, Postgres, Redis and this
client together): compare numbers only within one output.

Run: .venv/bin/python bench/batch_scale.py [--lines N] [--workers N] [--max-seconds S] [--out FILE]
Needs Redis (GENQ_BENCH_REDIS; flushes db GENQ_BENCH_SCALE_REDIS_DB, default 8, and refuses it while
other clients use it) and Postgres (GENQ_BENCH_PG_ADMIN; a temporary database is dropped at the end).
Runs on one machine take turns on a file lock; exit status 75: waited too long for it.
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
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, however this file is run
from common import (
    Procs,
    Profiler,
    check_redis_dbs_unused,
    drop_stale_databases,
    hot_spots,
    latency_stats,
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
REDIS_DB = int(os.environ.get("GENQ_BENCH_SCALE_REDIS_DB", "8"))
BROKER = f"{REDIS_HOST}/{REDIS_DB}"
LOCK_FILE = Path(tempfile.gettempdir()) / "genq-batch-scale.lock"
DB_PREFIX = "genq_scalebench_"
MODEL = "echo"
ENDPOINT = "/v1/completions"
REGISTRY_TOML = f'[models.{MODEL}]\nkind = "echo"\nsource = "none"\n'
# kombu's Redis transport, with genq's priority_steps 0..9 and sep ":", keeps one list per step.
QUEUE_KEYS = [f"genq.{MODEL}"] + [f"genq.{MODEL}:{step}" for step in range(1, 10)]
UNACKED_KEY = "unacked"  # kombu: messages delivered to a worker and not yet acked (acks late)
GOAL_ENQUEUE_S = 30
GOAL_P95_MS = 50
FAILED_STATUSES = ("failed", "cancelled", "expired", "cancelling")


def input_file(lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT,
                                "body": {"model": MODEL, "prompt": f"hello {i}"}}).encode() + b"\n"
                    for i in range(lines))


def start_genq(procs: Procs, tmp: Path, db_url: str, workers: int) -> httpx.Client:
    """The API and `workers` echo workers; returns a client once a probe job per worker has run."""
    (tmp / "models.toml").write_text(REGISTRY_TOML)
    env = stack_env(db_url=db_url, broker_url=BROKER, storage_url=f"file://{tmp / 'objects'}",
                    registry=tmp / "models.toml")
    redis.Redis.from_url(BROKER).flushdb()
    client = start_api(procs, env)
    for i in range(workers):
        procs.start(f"worker-{i}", ["-m", "genq", "worker", "--models", MODEL, "--log-level", "warning"], env)
    probes = []
    for i in range(workers):
        resp = client.post("/v1/jobs", json={"url": ENDPOINT, "body": {"model": MODEL, "prompt": f"warm {i}"}})
        resp.raise_for_status()
        probes.append(resp.json()["id"])

    def warmed() -> bool:
        procs.check_alive()
        return all(client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded" for job in probes)

    wait_for(warmed, 90, "genq workers (probe jobs)", 0.05)
    return client


def bench_batch(client: httpx.Client, lines: int, deadline: float, poll_s: float,
                profiler_factory: Any = None) -> dict[str, Any]:
    r = redis.Redis.from_url(BROKER)
    body = input_file(lines)
    t0 = time.perf_counter()
    resp = client.post("/v1/files", files={"file": ("batch_input.jsonl", body, "application/jsonl")},
                       data={"purpose": "batch"})
    upload_s = time.perf_counter() - t0
    assert resp.status_code == 200, resp.text
    file_id = resp.json()["id"]

    profiler = profiler_factory() if profiler_factory else None
    t_post = time.perf_counter()
    resp = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": ENDPOINT,
                                            "completion_window": "24h"})
    post_ms = (time.perf_counter() - t_post) * 1000
    assert resp.status_code in (200, 202), resp.text
    assert resp.json()["status"] == "validating", resp.json()["status"]
    batch_id = resp.json()["id"]

    validating_ms: list[float] = []
    drain_ms: list[float] = []
    violations: list[dict[str, Any]] = []
    last_completed = 0
    validated_at = enqueued_at = completed_at = None
    batch: dict[str, Any] = resp.json()
    capped = False
    next_poll = t_post
    while True:
        if time.perf_counter() >= deadline:
            capped = True
            break
        start = time.perf_counter()
        got = client.get(f"/v1/batches/{batch_id}")
        seen = time.perf_counter()
        ms = (seen - start) * 1000
        got.raise_for_status()
        batch = got.json()
        status, counts = batch["status"], batch["request_counts"]
        parts = counts["completed"] + counts["failed"] + counts["cancelled"] + counts["running"] + counts["queued"]
        if parts != counts["total"] or counts["completed"] < last_completed:
            violations.append({"t_s": round(seen - t_post, 3), "status": status, "counts": counts,
                               "previous_completed": last_completed})
        last_completed = max(last_completed, counts["completed"])
        if status in FAILED_STATUSES:
            raise RuntimeError(f"batch ended {status}: {counts} {batch.get('errors')}")
        if validated_at is None and status != "validating" and counts["total"] == lines:
            validated_at = seen
        (validating_ms if validated_at is None else drain_ms).append(ms)
        if validated_at is not None and enqueued_at is None:
            done = counts["completed"] + counts["failed"] + counts["cancelled"]
            with r.pipeline(transaction=False) as pipe:  # read after Postgres: see the docstring
                for key in QUEUE_KEYS:
                    pipe.llen(key)
                pipe.hlen(UNACKED_KEY)
                in_redis = sum(pipe.execute())
            if done + in_redis >= lines or status == "completed":
                enqueued_at = time.perf_counter()
                if profiler is not None:
                    profiler.stop()
        if status == "completed":
            completed_at = seen
            break
        next_poll += poll_s
        pause = next_poll - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:
            next_poll = time.perf_counter()  # behind (a slow poll): poll now, keep the period after
    if profiler is not None:
        profiler.stop()

    counts = batch["request_counts"]
    end = completed_at if completed_at is not None else time.perf_counter()
    drain_s = end - validated_at if validated_at is not None else None
    poll = latency_stats(drain_ms)
    poll.update(goal_p95_ms=GOAL_P95_MS,
                meets_goal=poll["p95_ms"] is not None and poll["p95_ms"] < GOAL_P95_MS and not capped,
                count_violations=len(violations))
    validated_s = round(validated_at - t_post, 3) if validated_at is not None else None
    enqueued_s = round(enqueued_at - t_post, 3) if enqueued_at is not None else None
    result: dict[str, Any] = {
        "lines": lines, "input_bytes": len(body), "upload_s": round(upload_s, 3),
        "batch_post_ms": round(post_ms, 2), "validated_s": validated_s, "enqueued_s": enqueued_s,
        "goal_enqueue_s": GOAL_ENQUEUE_S,
        "meets_enqueue_goal": enqueued_s is not None and enqueued_s < GOAL_ENQUEUE_S,
        "poll": poll,
        "poll_validating": latency_stats(validating_ms),
        "drain": {"seconds": round(drain_s, 3) if drain_s is not None else None,
                  "jobs": counts["completed"],
                  "jobs_per_s": round(counts["completed"] / drain_s, 1) if drain_s else None},
        "capped": capped,
        "progress": {"status": batch["status"], "request_counts": counts},
    }
    if violations:
        result["violations_sample"] = violations[:5]
    return result


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(),
            **server_versions(REDIS_HOST, PG_ADMIN),
            **package_versions("celery", "kombu", "redis", "sqlalchemy", "psycopg", "fastapi", "uvicorn")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=50_000, help="lines in the batch input file")
    parser.add_argument("--workers", type=int, default=1, help="echo worker processes")
    parser.add_argument("--max-seconds", type=float, default=600, help="cap on the whole run; then report progress")
    parser.add_argument("--poll-ms", type=float, default=50, help="period of the batch polls")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy raw output file: profile the API from the batch POST until enqueued")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--lock-wait", type=float, default=600, help="seconds to wait for another run")
    args = parser.parse_args()
    if args.lines < 1 or args.workers < 1:
        parser.error("--lines and --workers must be at least 1")
    # Turn SIGTERM into SystemExit so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = take_turn(LOCK_FILE, args.lock_wait, "batch scale benchmark")
    deadline = time.perf_counter() + args.max_seconds
    check_redis_dbs_unused(REDIS_HOST, (REDIS_DB,), "GENQ_BENCH_SCALE_REDIS_DB")

    db_name = f"{DB_PREFIX}{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    with tempfile.TemporaryDirectory(prefix="genq-scalebench-") as tmpdir, \
            psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        drop_stale_databases(admin, DB_PREFIX)  # holding the lock: unused ones were left by a killed run
        admin.execute(f'CREATE DATABASE "{db_name}"')
        try:
            with procs:  # on an error, the logs' tails to stderr; then the processes are stopped
                facts = machine()  # before anything of ours runs: the load average is the machine's own
                result: dict[str, Any] = {}
                client = start_genq(procs, tmp, f"{base}/{db_name}", args.workers)
                factory = None
                if args.profile is not None:
                    api_pid = procs.procs["api"].pid
                    factory = lambda: Profiler(api_pid, args.profile.resolve())  # noqa: E731
                result.update(bench_batch(client, args.lines, deadline, args.poll_ms / 1000, factory))
                procs.check_alive()
                client.close()
                result["workers"] = args.workers
                result["machine"] = facts
                if args.profile is not None and args.profile.exists():
                    result["profile"] = hot_spots(args.profile)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(BROKER).flushdb()
    lock.close()
    print_result(result, args.out)


if __name__ == "__main__":
    main()
