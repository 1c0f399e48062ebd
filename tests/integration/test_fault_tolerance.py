"""Faults injected for real, mid-batch, against private Redis and Postgres servers this module
starts on free ports: the broker down at submit, a worker SIGKILLed, Redis restarted (losing every
queued message), Postgres restarted, a poison job that kills its worker every time, and workers
stopped by SIGTERM / SIGQUIT / SIGTERM-then-SIGKILL.

Each test submits a batch of at least 200 jobs and then checks what a user would: every job
ended, the batch's counts add up, every succeeded job has exactly one output object. Figures
(jobs, faults, jobs lost, duplicate outputs) go to var/fault-figures.json.

The last tests check that recovery is prompt while the queue is busy (a worker SIGKILLed, a
FLUSHALL under steady traffic, an API dead mid-validation) and print their timings as
`recovery figures`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import Stack
from tests.support.servers import PG_BIN, PrivatePostgres, PrivateRedis
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BATCH = 200
DOWNTIME_S = 3.0
FIGURES = Path(__file__).resolve().parents[2] / "var" / "fault-figures.json"

if shutil.which("redis-server") is None or not (PG_BIN / "initdb").exists():
    pytest.skip("needs redis-server and Postgres server binaries", allow_module_level=True)


# --- private servers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.init()
    pg.start()
    yield pg
    try:
        pg.stop()
    finally:
        shutil.rmtree(pg.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    yield r
    if r.proc and r.proc.poll() is None:
        r.kill()


@pytest.fixture(scope="session")
def fault_figures() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        totals = {k: sum(r[k] for r in rows) for k in ("jobs_submitted", "jobs_lost", "duplicate_outputs")}
        faults: Counter[str] = Counter()
        for r in rows:
            faults.update(r["faults"])
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps({"tests": rows, "totals": {**totals, "faults": dict(faults)}}, indent=2))


# --- a stack on the private servers ------------------------------------------------------------

@dataclass
class Faulty:
    stack: Stack
    pg: PrivatePostgres
    redis: PrivateRedis
    db_url: str
    env: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_workers(self, model: str, names: list[str], *extra: str) -> None:
        for name in names:
            self.workers[name] = self.stack.start_worker(model, *extra, name=name)
        for name in names:
            self.stack.wait_worker_ready(self.workers[name], name)

    def db(self, sql: str, **params: Any) -> list[Any]:
        import psycopg

        with psycopg.connect(self.db_url.replace("+psycopg", ""), connect_timeout=3) as conn:
            return conn.execute(sql, params).fetchall()

    def running_on(self, name: str) -> str | None:
        """The id of a job now running on this worker (its id holds the process id)."""
        rows = self.db("SELECT id FROM jobs WHERE status = 'running' AND worker LIKE %(w)s",
                       w=f"%:{self.workers[name].pid}:%")
        return rows[0][0] if rows else None

    def freeze_mid_job(self, name: str) -> str:
        """SIGSTOP the worker at a moment it holds a job, so a signal sent next finds that job
        still in flight; returns the job id. The caller signals, then SIGCONTs or kills."""
        proc = self.workers[name]

        def frozen_with_job() -> str | None:
            proc.send_signal(signal.SIGSTOP)
            if job := self.running_on(name):
                return job
            proc.send_signal(signal.SIGCONT)
            return None

        return wait_for(frozen_with_job, 30, 0.01, f"a job running on {name}")


@pytest.fixture()
def faulty(stack_env: dict[str, str], private_pg: PrivatePostgres, private_redis: PrivateRedis,
           tmp_path: Path) -> Iterator[Faulty]:
    import psycopg
    import redis

    db = f"genq_fault_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(private_pg.url("postgres", "postgresql"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    redis.Redis(port=private_redis.port).flushall()
    env = {**stack_env, "GENQ_DATABASE_URL": private_pg.url(db), "GENQ_BROKER_URL": private_redis.url}
    stack = Stack(env, tmp_path)
    f = Faulty(stack, private_pg, private_redis, private_pg.url(db), env)
    try:
        stack.start_api()
        yield f
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        if private_redis.proc is None or private_redis.proc.poll() is not None:
            private_redis.start()  # a failed test may leave the servers down for the next one
        if not private_pg.running():
            private_pg.start()


def submit(c: httpx.Client, model: str, n: int = BATCH, poison_at: int | None = None) -> dict[str, Any]:
    requests = [{"custom_id": f"r{i}", "url": "/v1/completions",
                 "body": {"model": model, "prompt": "poison" if i == poison_at else f"prompt {i}"}}
                for i in range(n)]
    resp = c.post("/v1/batches", json={"requests": requests})
    assert resp.status_code == 202, resp.text
    return resp.json()  # type: ignore[no-any-return]


def completed(c: httpx.Client, batch_id: str) -> int:
    return int(c.get(f"/v1/batches/{batch_id}", timeout=5).json()["request_counts"]["completed"])


def wait_done(c: httpx.Client, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}", timeout=5).json())["status"]
                    in ("completed", "failed", "cancelled", "expired") and b, timeout, 0.25, "batch to end")


def audit(f: Faulty, batch: dict[str, Any], name: str, faults: dict[str, int],
          figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Check what a user sees after the faults, and record the figures."""
    from minio import Minio

    rows = f.db("SELECT id, status, attempts, error FROM jobs WHERE batch_id = %(b)s", b=batch["id"])
    env = f.env
    bucket, prefix = env["GENQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    client = Minio(env["GENQ_S3_ENDPOINT"], access_key=env["GENQ_S3_ACCESS_KEY"],
                   secret_key=env["GENQ_S3_SECRET_KEY"], secure=False)
    objects = Counter(o.object_name.split("/")[-3]
                      for o in client.list_objects(bucket, prefix=f"{prefix}/jobs/", recursive=True))
    statuses = Counter(status for _, status, _, _ in rows)
    lost = sum(1 for _, status, _, _ in rows if status not in ("succeeded", "failed", "cancelled"))
    duplicates = sum(objects[job_id] - 1 if status == "succeeded" else objects[job_id]
                     for job_id, status, _, _ in rows if objects[job_id] > (status == "succeeded"))
    missing = sum(1 for job_id, status, _, _ in rows if status == "succeeded" and objects[job_id] == 0)
    figure = {"test": name, "jobs_submitted": len(rows), "faults": faults, "jobs_lost": lost,
              "duplicate_outputs": duplicates, "missing_outputs": missing, "statuses": dict(statuses),
              "max_attempts_seen": max(a for _, _, a, _ in rows)}
    figures.append(figure)
    print("fault figures:", json.dumps(figure))

    counts = batch["request_counts"]
    assert len(rows) == counts["total"] >= BATCH
    assert lost == 0, statuses
    assert batch["status"] == "completed", batch
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == counts["total"], counts
    assert counts["completed"] == statuses["succeeded"]
    assert duplicates == 0 and missing == 0, figure
    return {job_id: (status, attempts, error) for job_id, status, attempts, error in rows}


def when_mid_batch(c: httpx.Client, batch_id: str, done: int = 50) -> None:
    wait_for(lambda: completed(c, batch_id) >= done, 90, 0.1, f"{done} jobs done")


# --- the faults ----------------------------------------------------------------------------------

def test_broker_down_at_submit(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    """Redis unreachable: submissions are still recorded and answered 202, then published once
    the broker is back."""
    faulty.start_workers("fault-echo", ["w1", "w2"], "--lease", "3")
    with faulty.stack.client() as c:
        faulty.redis.kill()
        down_at = time.monotonic()
        started = time.monotonic()
        batch = submit(c, "fault-echo")
        single = c.post("/v1/jobs", json={"url": "/v1/completions",
                                          "body": {"model": "fault-echo", "prompt": "alone"}})
        answered_in = time.monotonic() - started
        assert single.status_code == 202, single.text
        assert answered_in < 5, f"submissions took {answered_in:.1f}s with the broker down"
        unpublished = faulty.db("SELECT count(*) FROM jobs WHERE published_at IS NULL")[0][0]
        assert unpublished == BATCH + 1

        time.sleep(max(0.0, DOWNTIME_S - (time.monotonic() - down_at)))  # the injected downtime
        faulty.redis.start()
        final = wait_done(c, batch["id"])
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{single.json()['id']}").json())["status"] == "succeeded"
                       and j, 60, 0.25, "the single job")
    assert job["result"]["choices"][0]["text"] == "alone"
    jobs = audit(faulty, final, "broker_down_at_submit", {"broker_down_at_submit": 1}, fault_figures)
    assert all(status == "succeeded" for status, _, _ in jobs.values())
    assert faulty.db("SELECT count(*) FROM jobs WHERE published_at IS NULL")[0][0] == 0


def test_worker_killed_mid_batch(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    faulty.start_workers("fault-echo", ["victim", "w2"], "--lease", "2")
    with faulty.stack.client() as c:
        batch = submit(c, "fault-echo")
        when_mid_batch(c, batch["id"])
        held = faulty.freeze_mid_job("victim")
        os.killpg(faulty.workers["victim"].pid, signal.SIGKILL)
        faulty.workers["victim"].wait(10)
        faulty.start_workers("fault-echo", ["rescuer"], "--lease", "2")
        final = wait_done(c, batch["id"])
    jobs = audit(faulty, final, "worker_killed", {"worker_sigkill": 1}, fault_figures)
    assert all(status == "succeeded" for status, _, _ in jobs.values())
    assert jobs[held][:2] == ("succeeded", 2)  # recovered through its lease, run once more


def test_redis_restarted_mid_batch(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    """The restart loses every queued message (no persistence): workers and the API reconnect,
    and the jobs whose messages vanished are published again."""
    faulty.start_workers("fault-echo", ["w1", "w2"], "--lease", "3")
    with faulty.stack.client() as c:
        batch = submit(c, "fault-echo")
        when_mid_batch(c, batch["id"])
        faulty.redis.kill()
        time.sleep(DOWNTIME_S)  # the injected downtime
        faulty.redis.start()
        final = wait_done(c, batch["id"])
        # The API publishes to the restarted broker too.
        job = c.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": "fault-echo", "prompt": "after"}})
        assert job.status_code == 202
        wait_for(lambda: c.get(f"/v1/jobs/{job.json()['id']}").json()["status"] == "succeeded", 60, 0.2,
                 "a job submitted after the restart")
    jobs = audit(faulty, final, "redis_restarted", {"redis_restart": 1}, fault_figures)
    assert all(status == "succeeded" for status, _, _ in jobs.values())


def test_postgres_restarted_mid_batch(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    """Workers retry their state writes until the database is back; the API answers 503 while it
    is down. No job is marked failed, none is lost."""
    faulty.start_workers("fault-echo", ["w1", "w2"], "--lease", "5")
    with faulty.stack.client() as c:
        batch = submit(c, "fault-echo")
        when_mid_batch(c, batch["id"])
        faulty.pg.stop()
        down_at = time.monotonic()
        refused = c.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": "fault-echo", "prompt": "x"}})
        status = c.get(f"/v1/batches/{batch['id']}")
        time.sleep(max(0.0, DOWNTIME_S - (time.monotonic() - down_at)))  # the injected downtime
        faulty.pg.start()
        final = wait_done(c, batch["id"])
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "database_unavailable"
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert status.status_code == 503
    jobs = audit(faulty, final, "postgres_restarted", {"postgres_restart": 1}, fault_figures)
    assert all(status == "succeeded" for status, _, _ in jobs.values()), Counter(s for s, _, _ in jobs.values())


def test_poison_job_fails_after_max_attempts(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    """A job that kills its worker every time ends `failed` after --max-attempts starts; the rest
    of its batch completes. Dead workers are restarted as a process manager would."""
    names = ["p1", "p2"]
    extra = ("--lease", "2", "--max-attempts", "3")
    faulty.start_workers("poison-echo", names, *extra)
    restarts = Counter[str]()
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.1):
            for name in names:
                proc = faulty.workers[name]
                if proc.poll() is not None and not stop.is_set():
                    restarts[name] += 1
                    faulty.workers[name] = faulty.stack.start_worker("poison-echo", *extra, name=name)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        with faulty.stack.client() as c:
            batch = submit(c, "poison-echo", BATCH + 1, poison_at=20)
            final = wait_done(c, batch["id"], timeout=150)
    finally:
        stop.set()
        supervisor.join(5)
    crashes = sum(restarts.values())
    jobs = audit(faulty, final, "poison_job", {"worker_crash_by_poison": crashes}, fault_figures)
    poison = faulty.db("SELECT id FROM jobs WHERE batch_id = %(b)s AND custom_id = 'r20'", b=batch["id"])[0][0]
    status, attempts, error = jobs[poison]
    assert (status, attempts, error["code"]) == ("failed", 3, "worker_lost"), jobs[poison]
    assert "stopped 3 times" in error["message"]
    assert crashes == 3
    assert final["request_counts"]["completed"] == BATCH and final["request_counts"]["failed"] == 1


def test_shutdown_finishes_or_hands_back(faulty: Faulty, fault_figures: list[dict[str, Any]]) -> None:
    """SIGTERM: the worker finishes its job and exits 0. SIGQUIT (cold): the job is handed back at
    once. SIGTERM then SIGKILL (a process manager's stop timeout): the lease recovers the job."""
    faulty.start_workers("fault-echo", ["warm", "cold", "killed"], "--lease", "3")
    with faulty.stack.client() as c:
        batch = submit(c, "fault-echo")
        when_mid_batch(c, batch["id"], 30)

        held_warm = faulty.freeze_mid_job("warm")
        faulty.workers["warm"].send_signal(signal.SIGTERM)
        faulty.workers["warm"].send_signal(signal.SIGCONT)
        assert faulty.workers["warm"].wait(20) == 0

        held_cold = faulty.freeze_mid_job("cold")
        faulty.workers["cold"].send_signal(signal.SIGQUIT)
        faulty.workers["cold"].send_signal(signal.SIGCONT)
        faulty.workers["cold"].wait(20)
        cold_status = faulty.db("SELECT status FROM jobs WHERE id = %(j)s", j=held_cold)[0][0]
        assert cold_status in ("queued", "succeeded")  # handed back (or just done), not left to its lease

        held_killed = faulty.freeze_mid_job("killed")
        # It may be one the cold worker handed back (an attempt already counted): read it now.
        killed_attempts = faulty.db("SELECT attempts FROM jobs WHERE id = %(j)s", j=held_killed)[0][0]
        faulty.workers["killed"].send_signal(signal.SIGTERM)  # the stop timeout runs out: SIGKILL
        os.killpg(faulty.workers["killed"].pid, signal.SIGKILL)
        faulty.workers["killed"].wait(10)

        faulty.start_workers("fault-echo", ["successor"], "--lease", "3")
        final = wait_done(c, batch["id"])
    jobs = audit(faulty, final, "graceful_shutdown",
                 {"worker_sigterm": 1, "worker_sigquit": 1, "worker_sigterm_then_sigkill": 1}, fault_figures)
    assert all(status == "succeeded" for status, _, _ in jobs.values()), \
        [v for v in jobs.values() if v[0] != "succeeded"]
    assert jobs[held_warm][:2] == ("succeeded", 1)  # finished by the worker that was stopping
    assert jobs[held_killed][1] == killed_attempts + 1  # recovered through its lease
    if cold_status == "queued":
        assert jobs[held_cold][1] == 2 and b"handed back" in (faulty.stack.logdir / "cold.log").read_bytes()


# --- recovery is prompt ----------------------------------------------------------------------------

PACED = "paced-echo"  # test registry: an echo model taking 0.3 s a job, served by no shared worker


def test_a_killed_workers_job_runs_again_ahead_of_a_busy_queue(faulty: Faulty) -> None:
    """The job of a SIGKILLed worker is running again on the other worker within seconds of its
    lease running out, not after the queued work submitted behind it (about 20 s here)."""
    faulty.start_workers(PACED, ["victim", "rescuer"], "--lease", "2")
    with faulty.stack.client() as c:
        batch = submit(c, PACED, 60)
        when_mid_batch(c, batch["id"], 3)
        held = faulty.freeze_mid_job("victim")
        os.killpg(faulty.workers["victim"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        faulty.workers["victim"].wait(10)
        wait_for(lambda: faulty.db("SELECT 1 FROM jobs WHERE id = %(j)s AND attempts = 2 AND status IN "
                                   "('running', 'succeeded')", j=held), 10, 0.05, "the held job running again")
        rerun_after = time.monotonic() - killed_at
        queued = faulty.db("SELECT count(*) FROM jobs WHERE batch_id = %(b)s AND status = 'queued'",
                           b=batch["id"])[0][0]
        print(f"recovery figures: {json.dumps({'rerun_after_s': round(rerun_after, 2), 'still_queued': queued})}")
        assert queued > 10  # the queue was still busy: the job went ahead of it
        final = wait_done(c, batch["id"])
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 60
    assert faulty.db("SELECT status, attempts FROM jobs WHERE id = %(j)s", j=held) == [("succeeded", 2)]


def test_jobs_flushed_from_a_busy_redis_run_without_waiting_for_an_empty_queue(faulty: Faulty) -> None:
    """FLUSHALL while new jobs keep arriving faster than the worker takes them (so the queue is
    never empty): the batch's lost jobs are published again within one upkeep pass and the batch
    completes while the traffic goes on."""
    import redis

    faulty.start_workers(PACED, ["w1"], "--lease", "3")
    stop = threading.Event()

    def traffic() -> None:  # ~6 jobs/s against a worker taking ~3/s
        with faulty.stack.client() as c:
            while not stop.wait(0.15):
                c.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": PACED, "prompt": "new"}})

    with faulty.stack.client() as c:
        batch = submit(c, PACED, 40)
        when_mid_batch(c, batch["id"], 3)
        feeder = threading.Thread(target=traffic, daemon=True)
        feeder.start()
        try:
            flushed_wall, flushed_at = time.time(), time.monotonic()
            redis.Redis(port=faulty.redis.port).flushall()
            waiting = "SELECT count(*) FROM jobs WHERE batch_id = %(b)s AND status = 'queued'"
            lost = faulty.db(waiting + " AND published_at < %(t)s", b=batch["id"], t=flushed_wall)[0][0]
            assert lost > 10
            wait_for(lambda: faulty.db(waiting + " AND published_at < %(t)s", b=batch["id"], t=flushed_wall)[0][0]
                     == 0, 20, 0.1, "the lost jobs published again")
            republished_after = time.monotonic() - flushed_at
            final = wait_done(c, batch["id"], timeout=60)
            done_after = time.monotonic() - flushed_at
            backlog = faulty.db("SELECT count(*) FROM jobs WHERE status = 'queued'")[0][0]
        finally:
            stop.set()
            feeder.join(10)
    print("recovery figures:", json.dumps({"lost": lost, "republished_after_s": round(republished_after, 2),
                                           "batch_done_after_s": round(done_after, 2), "backlog": backlog}))
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 40
    assert backlog > 0  # the traffic kept the queue busy all along


def test_a_dead_apis_validating_batch_is_resumed_within_seconds(faulty: Faulty) -> None:
    """A file batch left `validating` by an API process that died mid-validation (recorded 15 s
    ago, its lease, if it took one, long run out) is validated by the live API's maintenance
    within a pass or two, not after 5 minutes."""
    lines = b"".join(b'{"custom_id": "c%d", "url": "/v1/completions", "body": {"model": "%s", "prompt": "p"}}\n'
                     % (i, PACED.encode()) for i in range(5))
    with faulty.stack.client() as c:
        upload = c.post("/v1/files", files={"file": ("in.jsonl", lines, "application/jsonl")},
                        data={"purpose": "batch"})
        assert upload.status_code == 200, upload.text
        batch_id = f"batch_dead{uuid.uuid4().hex[:8]}"
        faulty.db("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, total, created_at, "
                  "expires_at) VALUES (%(id)s, '/v1/completions', %(f)s, '24h', 'validating', 0, "
                  "%(t)s - 15, %(t)s + 86400) RETURNING id", id=batch_id, f=upload.json()["id"], t=time.time())
        inserted_at = time.monotonic()
        batch = wait_for(lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"] != "validating" and b,
                         20, 0.1, "the batch resumed")
        resumed_after = time.monotonic() - inserted_at
    print("recovery figures:", json.dumps({"validating_resumed_after_s": round(resumed_after, 2)}))
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 5, batch
