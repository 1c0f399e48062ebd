"""Helpers shared by the benchmark scripts in bench/ (queue_throughput, batch_scale, status_load, text_batching,
image_batching, gpu_check, constrained_decoding).

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
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
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


# --- latencies and profiles (batch_scale, status_load) ------------------------------------------

def percentile(sorted_ms: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_ms:
        return None
    rank = max(1, -(-len(sorted_ms) * q // 100))  # ceil(n * q / 100)
    return round(sorted_ms[int(rank) - 1], 2)


def latency_stats(ms: list[float]) -> dict[str, Any]:
    s = sorted(ms)
    return {"count": len(s), "p50_ms": percentile(s, 50), "p95_ms": percentile(s, 95),
            "p99_ms": percentile(s, 99), "max_ms": round(s[-1], 2) if s else None}


class Profiler:
    """py-spy recording a process as raw collapsed stacks, until stop()."""

    def __init__(self, pid: int, out: Path, *, subprocesses: bool = False, gil: bool = False) -> None:
        """`subprocesses`: the children of `pid` too; `gil`: only threads holding the GIL (where the
        Python CPU time goes, without the idle thread pool)."""
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.out = out
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                                      "--output", str(out), *(["--subprocesses"] if subprocesses else []),
                                      *(["--gil"] if gil else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let it attach before the work starts
        if self.proc.poll() is not None:
            raise RuntimeError(f"py-spy failed: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def hot_spots(raw: Path, top: int = 15) -> dict[str, Any]:
    """The frames with the most samples in py-spy's raw output: own (leaf) and inclusive time."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[frame, round(100 * n / total, 1)] for frame, n in c.most_common(top)]

    return {"file": str(raw), "samples": total, "own_pct": share(own) if total else [],
            "inclusive_pct": share(inclusive) if total else []}


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


# --- genq end to end: one API, one worker, one batch (text_batching, image_batching) ---------------

NDJSON = {"Content-Type": "application/x-ndjson"}


def stack_env(*, db_url: str, broker_url: str, storage_url: str, registry: Path) -> dict[str, str]:
    """This process's environment without any GENQ_ setting, plus the stack's own (offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_DATABASE_URL=db_url, GENQ_BROKER_URL=broker_url, GENQ_STORAGE_URL=storage_url,
               GENQ_MODELS_FILE=str(registry), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def drop_stale_databases(admin: Any, prefix: str) -> None:
    """Drop this benchmark's databases that nobody is connected to: left by a killed run. Call it
    only while holding the benchmark's lock. `admin` is an autocommit psycopg connection."""
    pattern = prefix.replace("_", r"\_") + "%"
    for (stale,) in admin.execute("SELECT datname FROM pg_database d WHERE datname LIKE %s AND NOT EXISTS "
                                  "(SELECT FROM pg_stat_activity a WHERE a.datname = d.datname)",
                                  (pattern,)).fetchall():
        admin.execute(f'DROP DATABASE IF EXISTS "{stale}"')


def start_api(procs: Procs, env: dict[str, str], timeout: float = 60) -> httpx.Client:
    """`python -m genq api` on a free port; returns a client once /readyz answers (migrations done)."""
    port = free_port()
    procs.start("api", ["-m", "genq", "api", "--port", str(port), "--log-level", "warning"], env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def ready() -> bool:
        procs.check_alive()
        return client.get("/readyz").status_code == 200

    wait_for(ready, timeout, "genq API /readyz", 0.05)
    return client


def run_job(client: httpx.Client, procs: Procs, url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Submit one job and wait until it succeeded (a worker's warm-up); fail if it did not."""
    resp = client.post("/v1/jobs", json={"url": url, "body": body})
    resp.raise_for_status()
    job_id = resp.json()["id"]

    def done() -> dict[str, Any] | None:
        procs.check_alive()
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"warm-up job for {body['model']} {job['status']}: {job['error']}")
        return job if job["status"] == "succeeded" else None

    return wait_for(done, timeout, f"warm-up job for {body['model']}", 0.05)


def run_batch(client: httpx.Client, procs: Procs, url: str, bodies: list[dict[str, Any]],
              timeout: float) -> dict[str, Any]:
    """POST the bodies as one NDJSON batch and wait for it to end. Returns accept_s (the POST's round
    trip), seconds (POST sent -> a poll sees `completed`), the final request_counts and the result
    lines in input order. Fails if the batch ends otherwise or any request failed."""
    lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": b}).encode() + b"\n"
                     for i, b in enumerate(bodies))
    started = time.perf_counter()
    resp = client.post("/v1/batches", content=lines, headers=NDJSON)
    accepted = time.perf_counter()
    if resp.status_code != 202:
        raise RuntimeError(f"batch refused: {resp.status_code} {resp.text[:2000]}")
    batch_id = resp.json()["id"]

    def completed() -> dict[str, Any] | None:
        procs.check_alive()
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("failed", "cancelled", "expired"):
            raise RuntimeError(f"batch ended {batch['status']}: {batch['request_counts']}")
        return batch if batch["status"] == "completed" else None

    # Each poll costs the API and Postgres a few ms of CPU that the worker would otherwise use: poll
    # about every 0.5% of the time elapsed so far (0.05-0.5 s), which bounds the timing error alike.
    batch = wait_for(completed, timeout, f"batch of {len(bodies)} {bodies[0]['model']} requests",
                     lambda: min(0.5, max(0.05, (time.perf_counter() - started) / 200)))
    seconds = time.perf_counter() - started
    results = [json.loads(line) for line in client.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
    order = {f"r{i}": i for i in range(len(bodies))}
    results.sort(key=lambda line: order.get(line["custom_id"], len(order)))
    failed = [r for r in results if r.get("error") or (r.get("response") or {}).get("status_code") != 200]
    counts = batch["request_counts"]
    if counts["completed"] != len(bodies) or failed or len(results) != len(bodies):
        raise RuntimeError(f"batch {batch_id}: {counts}, {len(results)} result lines; first failure: "
                           f"{failed[0] if failed else None}")
    return {"batch_id": batch_id, "accept_s": accepted - started, "seconds": seconds, "request_counts": counts,
            "results": results}


def worker_metric_lines(client: httpx.Client) -> list[str]:
    """The `genq_worker*` samples of the API's /metrics (the workers' batching counters), or []."""
    resp = client.get("/metrics")
    if resp.status_code != 200:
        return []
    return [line for line in resp.text.splitlines() if line.startswith("genq_worker")]


def logged_batches(log_file: Path, start: int = 0) -> dict[str, Any] | None:
    """What a worker's log says (from byte `start` on) about the batches it ran ("batch of N
    job(s), R row(s) on MODEL in S s", logged at debug level): how many batches of each row count.
    None when it logged none."""
    import re

    with log_file.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    sizes: dict[int, int] = {}
    for match in re.finditer(r"batch of (\d+) job\(s\), (\d+) row\(s\)", text):
        rows = int(match.group(2))
        sizes[rows] = sizes.get(rows, 0) + 1
    if not sizes:
        return None
    return {"batches": sum(sizes.values()), "batches_by_rows": {str(k): sizes[k] for k in sorted(sizes)}}


def start_stack(procs: Procs, env: dict[str, str], model: str, worker_flags: list[str], url: str,
                warm_up: dict[str, Any]) -> tuple[httpx.Client, str]:
    """The API and ONE `genq worker --models MODEL WORKER_FLAGS` (as `worker` in procs), warmed up
    by one job `warm_up` to `url`, so loading and first calls are not measured. Returns a client and
    the worker's command line."""
    client = start_api(procs, env)
    args = ["-m", "genq", "worker", "--models", model, *worker_flags]
    procs.start("worker", args, env)
    run_job(client, procs, url, warm_up, 600)
    return client, " ".join(["genq", *args[2:]])


def worker_flags(args: Any) -> list[str]:
    """`genq worker` flags from a benchmark's --worker-log-level and --worker-concurrency."""
    flags = ["--log-level", args.worker_log_level]
    if getattr(args, "worker_concurrency", None) is not None:
        flags += ["--concurrency", str(args.worker_concurrency)]
    return flags


def start_genq(procs: Procs, tmp: Path, *, db_url: str, registry: Path, broker_url: str, model: str, url: str,
               warm_up: dict[str, Any], flags: list[str],
               extra_env: dict[str, str] | None = None) -> tuple[httpx.Client, dict[str, str]]:
    """The API and one worker for `model` on a throwaway database, the broker's Redis db (emptied
    first) and file:// storage under tmp, warmed up by one job; returns a client and what the
    stack is, for the result."""
    import redis

    env = stack_env(db_url=db_url, broker_url=broker_url, storage_url=f"file://{tmp / 'objects'}", registry=registry)
    env.update(extra_env or {})
    redis.Redis.from_url(broker_url).flushdb()
    client, worker = start_stack(procs, env, model, flags, url, warm_up)
    stack = {"database": "postgres (temporary database)", "broker": f"redis db {broker_url.rsplit('/', 1)[1]}",
             "storage": "file://", "worker": worker}
    return client, stack


def measured_batch(client: httpx.Client, procs: Procs, url: str, bodies: list[dict[str, Any]], *,
                   log_file: Path | None = None, jobs_before: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """run_batch, plus what the worker reports about it: returns the batch (run_batch's dict) and a
    report of accept_s, the request counts, the worker's metrics and its share of the batching
    counters (`jobs_before` jobs ran since the worker's counters were last read: its warm-up) and the
    batches it logged meanwhile (from log_file, at debug level)."""
    before = settled_worker_metrics(client, procs, [], jobs_before) or []
    log_at = log_file.stat().st_size if log_file and log_file.exists() else 0
    got = run_batch(client, procs, url, bodies, 3600)
    report: dict[str, Any] = {"accept_s": round(got["accept_s"], 3), "succeeded": got["request_counts"]["completed"],
                              "failed": got["request_counts"]["failed"]}
    report["worker_metrics"] = settled_worker_metrics(client, procs, before, len(bodies))
    if counts := batch_counts(before, report["worker_metrics"]):
        report["worker_batches"] = counts  # this batch's share of the worker's batching counters
    if log_file and (batches := logged_batches(log_file, log_at)):
        report["worker_logged_batches"] = batches
    return got, report


def settled_worker_metrics(client: httpx.Client, procs: Procs, before: list[str], jobs: int,
                           wait_s: float = 15) -> list[str] | None:
    """The `genq_worker*` /metrics samples once the batching counters cover `jobs` more jobs than
    `before` (read before the batch: workers report on a heartbeat, so the last batches show up a
    few seconds late); after wait_s, whatever is there. None when the API exposes no genq_worker
    metrics at all."""
    if not worker_metric_lines(client) and not before:
        return None

    def settled() -> list[str] | None:
        procs.check_alive()
        now = worker_metric_lines(client)
        counts = batch_counts(before, now)
        return now if counts is not None and counts["jobs"] >= jobs else None

    try:
        return wait_for(settled, wait_s, "worker metrics", 0.5)
    except TimeoutError:
        return worker_metric_lines(client)


def _metric_sums(lines: list[str]) -> dict[str, float]:
    """Prometheus samples summed by metric name over their labels."""
    sums: dict[str, float] = {}
    for line in lines:
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums


def batch_counts(before: list[str], after: list[str] | None) -> dict[str, Any] | None:
    """What the worker's batching counters (genq_worker_batch*_total) grew by between two reads of
    /metrics: batches, jobs and rows run, and the mean rows per batch. None without those counters."""
    if not after:
        return None
    old, new = _metric_sums(before), _metric_sums(after)
    if "genq_worker_batches_total" not in new:
        return None
    grew = {key: new.get(f"genq_worker_{name}_total", 0.0) - old.get(f"genq_worker_{name}_total", 0.0)
            for key, name in (("batches", "batches"), ("jobs", "batch_jobs"), ("rows", "batch_rows"),
                              ("seconds", "batch_seconds"), ("splits", "batch_splits"))}
    out: dict[str, Any] = {k: int(v) if k != "seconds" else round(v, 3) for k, v in grew.items()}
    out["mean_rows_per_batch"] = round(grew["rows"] / grew["batches"], 2) if grew["batches"] else None
    return out


# --- the batching benchmarks (text_batching, image_batching) -------------------------------------------

def naive_sample(bodies: list[dict[str, Any]], sample: int) -> list[dict[str, Any]]:
    """The requests arm a times: `sample` of them spread evenly over the set (all if sample <= 0)."""
    if sample <= 0 or sample >= len(bodies):
        return bodies
    return [bodies[i * len(bodies) // sample] for i in range(sample)]


def bench_machine(redis_url: str, pg_admin: str, *packages: str) -> dict[str, Any]:
    """Facts about the machine and versions, recorded with each result."""
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # Other work on the machine slows the arms unevenly: a high load makes the ratios noisy.
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            **server_versions(redis_url, pg_admin), **package_versions("torch", *packages)}


def run_on_services(*, lock_file: Path, lock_wait: float, redis_host: str, redis_db: int, redis_env_hint: str,
                    pg_admin: str, db_prefix: str, measure: Callable[[Path, Any, str], dict[str, Any]],
                    out: Path | None) -> None:
    """Take this benchmark family's turn, then measure in a temporary directory with a throwaway
    Postgres database and a Redis db of its own (both emptied afterwards), and print the result."""
    import tempfile
    import uuid

    import psycopg
    import redis

    # Turn SIGTERM into SystemExit so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = take_turn(lock_file, lock_wait, "batching benchmark")
    check_redis_dbs_unused(redis_host, (redis_db,), redis_env_hint)
    db_name = f"{db_prefix}{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix=db_prefix.replace("_", "-")) as tmpdir, \
            psycopg.connect(pg_admin, autocommit=True) as admin:
        drop_stale_databases(admin, db_prefix)  # holding the lock: unused ones were left by a killed run
        try:
            result = measure(Path(tmpdir), admin, db_name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(f"{redis_host}/{redis_db}").flushdb()
    lock.close()
    print_result(result, out)
