"""A worker process's runtime: resident runners, job execution and lease upkeep.

`execute(job_id)` is a plain function of this object, so it is testable without a broker; the
Celery task in workers/app.py only calls it, from as many threads as the worker's concurrency.
Each call claims its job, prepares it on the model's runner (from the model cache) and waits for
the batcher to run it together with other jobs of that model; then it records its own outcome.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from genq.shared import jobs as jobs_data
from genq.shared import outbox, webhooks
from genq.shared.broker import Publish, Publisher
from genq.shared.config import Settings
from genq.shared.db import Job, is_unavailable, retry_unavailable, session_factory, session_scope
from genq.shared.errors import ErrorCode, job_error
from genq.shared.finalize import maybe_finalize_batch
from genq.shared.kinds import KINDS, body_model
from genq.shared.registry import Registry
from genq.shared.storage import MissingObject, Storage, StorageError, StorageUnavailable, retry_storage
from genq.shared.streams import token_sink
from genq.shared.upkeep import run_tasks, upkeep_tasks
from genq.workers.adapters import AdapterFiles
from genq.workers.batching import Arrival, Batcher
from genq.workers.cache import ModelCache
from genq.workers.coalesce import Coalescer
from genq.workers.isolation import Isolation
from genq.workers.runners import make_runner
from genq.workers.runners.base import BatchItem, InvalidRequest, JobCancelled, RunContext, Runner
from genq.workers.state import report_state
from genq.workers.watch import JobWatch

if TYPE_CHECKING:
    from genq.workers.fine_tune import FineTuner

log = logging.getLogger("genq.worker")
CHECK_EVERY_S = 0.25  # progress reports and cancel checks, for all held jobs at once
REPORT_EVERY_S = 2.0  # worker state for /metrics, while jobs are finishing


def output_key(job_id: str, attempt: int, name: str) -> str:
    return f"jobs/{job_id}/{attempt}/{name}"


def _public_message(exc: Exception) -> str:
    """A failed job's message, shown to its tenant: a runner's own error as it is, but nothing of
    storage's hosts or keys (the full error is in the worker's log)."""
    if isinstance(exc, StorageError):
        return str(exc)  # written to name no host, bucket or key
    if isinstance(exc, MissingObject):
        return "an object the job needs is missing from storage"
    return f"{type(exc).__name__}: {exc}"[:2000]


class WorkerRuntime:
    def __init__(self, settings: Settings, registry: Registry, storage: Storage, publisher: Publisher, *,
                 models: list[str], lease_s: float, max_attempts: int,
                 device: str | None = None, memory_budget: int = 0) -> None:
        unknown = [m for m in models if m not in registry]
        if unknown:
            raise ValueError(f"models not in the registry: {', '.join(unknown)}")
        self.settings, self.registry, self.storage, self.publisher = settings, registry, storage, publisher
        self.sessions = session_factory(settings.database_url)
        self.models = models
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.device = device
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        specs = {m: registry.get(m) for m in models}
        self.cache = ModelCache(specs, lambda spec: make_runner(spec, device=device),  # type: ignore[arg-type]
                                budget_bytes=memory_budget, on_change=lambda: report_state(self))
        self.memory_budget = memory_budget
        self.batcher = Batcher()
        self.adapters = AdapterFiles(self.sessions, storage, registry)
        self._running: dict[str, tuple[Job, list[str]]] = {}  # job id -> (job, outputs written so far)
        self._running_lock = threading.Lock()
        self._stop = threading.Event()
        self.stopping = threading.Event()  # set by a cold shutdown: errors now mean "interrupted"
        self.watch = JobWatch(self.sessions, self.worker_id, period_s=CHECK_EVERY_S, stopping=self.stopping)
        self._thread: threading.Thread | None = None
        self._reported = 0.0
        self.upkeep = upkeep_tasks(self.sessions, storage, publisher, models)
        self.tokens = token_sink(settings.broker_url)  # where streaming jobs' text goes as it is made
        # Claims and outcomes (and batch checks) of concurrent jobs share round trips (workers/coalesce.py).
        self._claims = Coalescer(self._claim_group)
        self._finishes = Coalescer(self._finish_group, after=self._check_batches)
        self.isolation = Isolation()
        self.fine_tuner: FineTuner | None = None  # set when this worker takes fine-tuning jobs (workers/app.py)
        self.training_models: list[str] = []

    # --- models --------------------------------------------------------------------------

    def runner(self, model: str) -> Runner:
        """The model's runner, loaded if needed (not pinned: for inspection and preloading)."""
        runner = self.cache.acquire(model)
        self.cache.release(model)
        return runner

    def preload(self) -> None:
        """Load the served models in order while they fit the memory budget; the rest load on
        their first job."""
        for model in self.models:
            if not self.cache.fits(model):
                log.info("not preloading %s: it would not fit the memory budget with %s loaded", model,
                         ", ".join(self.cache.resident()))
                continue
            self.runner(model)

    # --- one job ---------------------------------------------------------------------------

    def _context(self, job: Job, written: list[str]) -> RunContext:
        job_id = job.id

        def put_output(name: str, data: bytes, content_type: str) -> str:
            key = output_key(job_id, job.attempts, name)
            # Waits out a short storage outage here; a longer one hands the job back (_run_claimed).
            retry_storage(lambda: self.storage.put(key, data, content_type),
                          what=f"storing output {name} of job {job_id}")
            written.append(key)
            return key

        def emit(deltas: list[tuple[int, str]]) -> None:
            try:
                self.tokens.append(job_id, job.attempts, deltas)  # type: ignore[union-attr]
            except Exception:  # a lost piece is sent with the result; the job goes on
                log.warning("job %s: could not stream %d piece(s)", job_id, len(deltas), exc_info=True)

        streaming = self.tokens is not None and bool((job.body or {}).get("stream"))
        return RunContext(job_id=job_id, set_progress=lambda p: self.watch.progress(job_id, p),
                          is_cancelled=lambda: self.watch.cancelled(job_id), put_output=put_output,
                          emit=emit if streaming else None)

    def _shows(self, row: Job | None, status: str, attempts: int | None = None) -> bool:
        """Whether `row` is in `status` under this worker (and attempt): how a retry tells that an
        earlier try committed although its answer was lost with the connection."""
        if row is None or row.status != status or row.worker != self.worker_id:
            return False
        return attempts is None or row.attempts == attempts

    def _claim(self, job_id: str) -> tuple[Job | None, str]:
        tries = [0]

        def attempt() -> tuple[Job | None, str]:
            tries[0] += 1
            return self._claims.submit((job_id, tries[0] > 1))

        return retry_unavailable(attempt, what=f"claiming job {job_id}")

    def _claim_group(self, items: list[tuple[str, bool]]) -> list[tuple[Job | None, str]]:
        """Claim a group of (job id, is a retry) in one transaction; for each, the job if this
        worker holds it now, else None and the job's status."""
        ids = sorted({job_id for job_id, _ in items})
        with session_scope(self.sessions) as s:
            claimed = jobs_data.claim_jobs(s, ids, worker=self.worker_id, lease_s=self.lease_s)
            others = [i for i in ids if i not in claimed]
            rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(others)))} if others else {}
            s.expunge_all()
        statuses = {job_id: row.status for job_id, row in rows.items()}
        answers: list[tuple[Job | None, str]] = []
        for job_id, retried in items:
            job = claimed.pop(job_id, None)  # a duplicate message of the same job gets None
            if job is None and retried and job_id not in self._running and self._shows(rows.get(job_id), "running"):
                job = rows.pop(job_id)  # an earlier try committed, but its answer was lost
            answers.append((job, "running") if job else (None, statuses.get(job_id, "unknown job")))
        return answers

    def _finish(self, job: Job, status: str, **values: Any) -> bool:
        """Record the outcome, retrying while the database is unreachable (the work is done and
        must not be lost to a restart of the database)."""
        tries = [0]

        def attempt() -> bool:
            tries[0] += 1
            return self._finishes.submit((job, jobs_data.Outcome(job.id, status, **values), tries[0] > 1))

        return retry_unavailable(attempt, what=f"recording job {job.id}")

    def _finish_group(self, items: list[tuple[Job, jobs_data.Outcome, bool]]) -> list[bool]:
        """Record a group of (job, outcome, is a retry) and queue their webhook events in one
        transaction; for each, whether it is recorded (by this try, or by an earlier one whose
        answer was lost)."""
        with session_scope(self.sessions) as s:
            recorded = jobs_data.finish_jobs(s, [o for _, o, _ in items], worker=self.worker_id)
            # Rows in the outbox, which the API sends; only jobs with a webhook are read again.
            webhooks.notify_jobs(s, sorted(j.id for j, _, _ in items if j.id in recorded and j.webhook_url))
            retried = [j.id for j, _, again in items if again and j.id not in recorded]
            rows = {r.id: r for r in s.scalars(select(Job).where(Job.id.in_(retried)))} if retried else {}
        return [job.id in recorded or (again and self._shows(rows.get(job.id), o.status, job.attempts))
                for job, o, again in items]

    def _check_batches(self, items: list[tuple[Job, jobs_data.Outcome, bool]]) -> None:
        """After a group's outcomes are committed: finalize each of their batches whose last job
        this was, one check per batch however many of its jobs the group holds."""
        for batch_id in dict.fromkeys(job.batch_id for job, _, _ in items if job.batch_id):
            try:
                maybe_finalize_batch(self.sessions, self.storage, batch_id)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                log.warning("batch %s not finalized yet (database unavailable); upkeep will", batch_id)

    def execute(self, job_id: str) -> str:
        """Run one job if this worker can claim it. Returns what happened, for logs and tests."""
        with self.isolation.held(), self.batcher.arrival() as arrival:  # a batch may wait for this job
            job, status = self._claim(job_id)
            if job is None:
                log.info("job %s skipped (%s)", job_id, status)
                return f"skipped ({status})"
            written: list[str] = []  # output objects of this attempt, removed unless it succeeds
            with self._running_lock:
                self._running[job_id] = (job, written)
            self.watch.add(job_id)
            try:
                # A job whose earlier start did not finish may be what killed that worker.
                with self.isolation.alone() if job.attempts > 1 else nullcontext(True) as alone:
                    outcome = self._run_claimed(job, written, arrival) if alone else self._hand_back_later(job)
            except BaseException as exc:
                # A shutdown interrupting the job hands it back; other errors (the database down
                # past the retries) leave it to its lease.
                if self.stopping.is_set() or not isinstance(exc, Exception):
                    self._abandon(job, written)
                raise
            finally:
                with self._running_lock:
                    self._running.pop(job_id, None)
                self.watch.remove(job_id)
        log.info("job %s %s (model %s, attempt %d)", job_id, outcome, job.model, job.attempts)
        self._report_soon()
        return outcome

    def _report_soon(self) -> None:
        """Report the worker's counters for /metrics at most every REPORT_EVERY_S while jobs end
        (the lease loop reports too, every lease/3 seconds, when the worker is idle)."""
        now = time.monotonic()
        with self._running_lock:
            if now - self._reported < REPORT_EVERY_S:
                return
            self._reported = now
        report_state(self)

    def _drop_earlier_attempts(self, job: Job) -> None:
        """After a retried job succeeded: remove what earlier attempts stored before their worker
        died (a live earlier attempt removes its own outputs when its guarded finish fails)."""
        for attempt in range(1, job.attempts):
            try:
                dropped = self.storage.delete_prefix(f"jobs/{job.id}/{attempt}/")
            except Exception:  # leftovers are untidy, not wrong: the job names its own key
                log.warning("could not remove the outputs of job %s attempt %d", job.id, attempt, exc_info=True)
                continue
            if dropped:
                log.info("removed %d output(s) left by job %s attempt %d", dropped, job.id, attempt)

    def _discard(self, written: list[str]) -> None:
        """Remove this attempt's outputs. With storage down some stay: untidy, not wrong (the
        job names its own keys, and a later attempt of the same number overwrites them)."""
        for key in written:
            try:
                self.storage.delete(key)
            except StorageError as exc:
                log.warning("could not remove output %s: %s", key, exc)

    def _abandon(self, job: Job, written: list[str], *, why: str = "worker stopping",
                 count_attempt: bool = True) -> bool:
        """Hand a job back to the queue and drop this attempt's outputs, when the process stops
        before the job ends or storage is down. If this fails too, the job's lease runs out and it
        is recovered. True if the job went back to the queue."""
        try:
            with session_scope(self.sessions) as s:
                released = jobs_data.release_job(s, job.id, worker=self.worker_id, count_attempt=count_attempt)
                recorded = not released and self._shows(s.get(Job, job.id), "succeeded", job.attempts)
        except Exception:
            log.exception("could not hand back job %s; its lease will expire", job.id)
            return False
        if not recorded:  # keep the outputs only of a success this attempt already recorded
            self._discard(written)
        if released:
            log.warning("job %s handed back to the queue (%s)", job.id, why)
        return released

    def _hand_back_unstored(self, job: Job, written: list[str], exc: StorageUnavailable) -> str:
        """Storage stayed unavailable through retry_storage's retries: the job is not at fault, so
        it goes back to the queue without using up one of its attempts (those stop poison jobs;
        counting an outage would fail healthy jobs after a few retry windows), and is published
        again at once. While storage stays down this repeats, paced by those retries."""
        log.warning("job %s: %s; handing it back to the queue", job.id, exc, exc_info=exc.__cause__ or exc)
        if self._abandon(job, written, why="storage unavailable", count_attempt=False):
            outbox.publish_and_mark(self.sessions, self.publisher, [Publish(job.id, job.model, job.priority)])
        return "handed back"

    def _hand_back_later(self, job: Job) -> str:
        """Another job that lost a worker runs alone here: this one, which lost one too, goes back
        to the queue unstarted (its attempt given back) and is published again (workers/isolation.py)."""
        if self._abandon(job, [], why="another job runs alone", count_attempt=False):
            outbox.publish_and_mark(self.sessions, self.publisher,
                                    [Publish(job.id, job.model, job.priority, front=True)])
        return "handed back"

    def hand_back_all(self) -> None:
        """At process exit: hand back every job still held (threads a shutdown did not wait for)."""
        self.stopping.set()  # and have those threads stop at their next cancel check
        with self._running_lock:
            held = list(self._running.values())
        for job, written in held:
            self._abandon(job, written)

    def _serve(self, job: Job, written: list[str], arrival: Arrival | None) -> dict[str, Any]:
        """Prepare the job on its model's runner and have the batcher run it; its response body."""
        body = body_model(job.url).model_validate(job.body)
        runner = self.cache.acquire(job.model)  # pinned: not evicted while this job needs it
        try:
            item = BatchItem(body, self._context(job, written))
            ref = body.adapter
            if ref is not None:
                if not KINDS[runner.spec.kind].adapters:
                    raise InvalidRequest(f"model {job.model} does not serve adapters", "body.adapter")
                item.adapter = self.adapters.local(ref, model=job.model)
            runner.prepare(item)
            return self.batcher.submit(job.model, runner, item, arrival)
        finally:
            self.cache.release(job.model)

    def _run_claimed(self, job: Job, written: list[str], arrival: Arrival | None = None) -> str:
        if job.attempts > self.max_attempts:
            self._finish(job, "failed", error=job_error(
                ErrorCode.TOO_MANY_ATTEMPTS,
                f"the job was started {job.attempts - 1} times without finishing; giving up"))
            return "failed"
        if job.model not in self.registry:
            self._finish(job, "failed",
                         error=job_error(ErrorCode.MODEL_NOT_FOUND, f"model {job.model!r} is not served"))
            return "failed"
        try:
            result = self._serve(job, written, arrival)
        except JobCancelled:
            if self.stopping.is_set():
                self._abandon(job, written)
                return "handed back"
            outcome, values = "cancelled", None
        except InvalidRequest as exc:
            outcome, values = "failed", {"error": job_error(ErrorCode.INVALID_REQUEST, str(exc), exc.param)}
        except StorageUnavailable as exc:
            if self.stopping.is_set():
                raise
            return self._hand_back_unstored(job, written, exc)
        except Exception as exc:
            if self.stopping.is_set():
                raise  # interrupted by a cold shutdown, not the job's fault
            log.exception("job %s failed", job.id)
            outcome, values = "failed", {"error": job_error(ErrorCode.RUNTIME_ERROR, _public_message(exc))}
        else:
            outcome, values = "succeeded", {"result": result}
        if values is not None and self._finish(job, outcome, **values) and outcome == "succeeded":
            self._drop_earlier_attempts(job)
            return outcome
        # Failed, cancelled meanwhile, or the lease passed to another worker: leave nothing behind.
        self._discard(written)
        return outcome if outcome != "succeeded" else "discarded"

    # --- leases ----------------------------------------------------------------------------

    def maintain_once(self) -> None:
        """Renew this worker's leases; recover jobs of dead workers; finish stuck batches."""
        with self._running_lock:
            held = list(self._running)
        with session_scope(self.sessions) as s:
            jobs_data.renew_leases(s, held, worker=self.worker_id, lease_s=self.lease_s)
        with session_scope(self.sessions) as s:
            to_publish, failed = jobs_data.requeue_expired(s, models=self.models, max_attempts=self.max_attempts)
            for job_id in failed:
                webhooks.notify_job(s, job_id)
        if to_publish:
            log.warning("recovering %d job(s) whose worker stopped: %s", len(to_publish),
                        ", ".join(p.job_id for p in to_publish[:10]))
            outbox.publish_and_mark(self.sessions, self.publisher, to_publish)
        for job_id in failed:
            with session_scope(self.sessions) as s:
                batch_id = s.get(Job, job_id).batch_id  # type: ignore[union-attr]
            if batch_id:
                maybe_finalize_batch(self.sessions, self.storage, batch_id)
        if self.fine_tuner is not None:
            self.fine_tuner.maintain(self.training_models)
        # The upkeep the API runs too, for these models, so queued work moves with no API process up.
        run_tasks(self.upkeep)
        report_state(self)

    def _loop(self) -> None:
        period = max(0.5, self.lease_s / 3)
        while not self._stop.wait(period):
            try:
                self.maintain_once()
            except Exception:
                log.exception("lease upkeep failed; retrying")

    def start_maintenance(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="genq-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.stop()
        claims, finishes = self._claims, self._finishes
        log.info("worker %s: %d claims in %d groups, %d outcomes in %d groups", self.worker_id,
                 claims.items, claims.groups, finishes.items, finishes.groups)
