"""Dynamic batching: queued jobs of one model that can share a forward pass run together.

Each job keeps its own Celery task and thread: the thread claims the job, prepares it (tokenizes,
checks it against the model) and hands it to the `Batcher`, then waits for its own outcome and
records it, so acknowledgement stays per job. One executor thread per worker owns the device: it
takes the oldest waiting item, gathers items with the same model and batch key up to the model's
`max_batch_size` rows, and runs them in one call.

Which group: the oldest item's, unless it is not full and another key's group holds more rows. A
mixed queue (images of several sizes or steps) would otherwise run whatever key its oldest item
has, in small batches, while full ones wait behind it. So the fullest group goes first, but an
oldest item is passed over by at most OVERTAKES batches, after which its group runs however full:
a rare key waits a few batches, never forever.

When to start a batch: at once when the batch is full; when no other job is on its way in
(claimed or being prepared by another thread) and none has joined for GRACE_S, so a lone job is
held back by a few milliseconds at most; otherwise when the oldest item has waited `max_wait_ms`
(registry option, default 50 ms). The grace keeps a burst that is still being delivered by the
broker, one message at a time, from starting with its first few jobs.

A continuous runner (text) batches at the iteration level instead: the group starts a running
batch, which pulls more waiting items of its model as rows free up and hands each item's outcome
back as soon as it is known (`_serve`).

If a batched call raises, nobody fails yet: the items are retried in two halves, recursively, so
only an item that fails on its own gets the error (an out-of-memory batch also halves this way).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from genq.workers.runners.base import BatchItem, Choose, ContinuousRunner, Outcome, Runner, finish

log = logging.getLogger("genq.worker")
GRACE_S = 0.005
OVERTAKES = 4  # batches of other keys that may run while an item is the oldest waiting


@dataclass
class _Waiting:
    model: str
    runner: Runner
    item: BatchItem
    key: Hashable
    rows: int
    arrived: float = field(default_factory=time.monotonic)
    overtaken: int = 0  # batches chosen over this item's own while it was the oldest
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


@dataclass
class BatchStats:
    """Per-model counters, reported by the worker to /metrics."""

    batches: int = 0
    items: int = 0
    rows: int = 0
    seconds: float = 0.0
    splits: int = 0  # batches retried in halves after an error
    largest: int = 0


class Arrival:
    """A job on its way into the batcher (being claimed or prepared). While any is on its way, a
    partly filled batch waits for it, up to the model's max wait."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.pending = batcher, False

    def __enter__(self) -> Arrival:
        with self.batcher._cond:
            self.batcher._arriving += 1
            self.pending = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self.batcher._cond:
            self._leave()

    def _leave(self) -> None:  # under the batcher's lock
        if self.pending:
            self.pending = False
            self.batcher._arriving -= 1
            self.batcher._cond.notify_all()


class Batcher:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []  # arrival order
        self._arriving = 0
        self._joined = 0.0  # when the last item joined
        self._stop = False
        self.stats: dict[str, BatchStats] = {}
        self._thread = threading.Thread(target=self._loop, name="genq-batcher", daemon=True)
        self._thread.start()

    def arrival(self) -> Arrival:
        return Arrival(self)

    def submit(self, model: str, runner: Runner, item: BatchItem, arrival: Arrival | None = None) -> dict[str, Any]:
        """Run one prepared item, batched with others; return its response body or raise its error."""
        waiting = _Waiting(model, runner, item, runner.batch_key(item), max(1, runner.rows(item)))
        with self._cond:
            if self._stop:
                raise RuntimeError("the worker's batcher has stopped")
            self._waiting.append(waiting)
            self._joined = waiting.arrived
            if arrival is not None:
                arrival._leave()
            self._cond.notify_all()
        waiting.done.wait()
        assert waiting.outcome is not None
        outcome = finish(waiting.outcome)  # here, in the job's thread: the device has moved on
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    # --- the executor thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            self._run(group)

    def _next_group(self) -> list[_Waiting] | None:
        """Wait for work, then for the chosen group to fill (see the module docstring)."""
        with self._cond:
            while True:
                if self._stop and not self._waiting:
                    return None
                if not self._waiting:
                    self._cond.wait()
                    continue
                first = self._waiting[0]
                deadline = first.arrived + first.runner.spec.options.max_wait_ms / 1000
                group, rows, limit = self._choose(first)
                now = time.monotonic()
                settled = self._arriving == 0 and now - self._joined >= min(GRACE_S, deadline - first.arrived)
                if rows >= limit or settled or now >= deadline or self._stop:
                    if group[0] is not first:
                        first.overtaken += 1
                    for w in group:
                        self._waiting.remove(w)
                    return group
                wake = deadline if self._arriving else min(deadline, self._joined + GRACE_S)
                self._cond.wait(max(0.0, wake - now))

    def _choose(self, first: _Waiting) -> tuple[list[_Waiting], int, int]:
        """The oldest item's group, or the fullest other one while the oldest may be passed over;
        with its rows and its model's row limit."""
        best = self._gather(0)
        if best[1] >= best[2] or first.overtaken >= OVERTAKES:
            return best
        seen = {(first.model, first.key)}
        for at, w in enumerate(self._waiting):
            if (w.model, w.key) not in seen:
                seen.add((w.model, w.key))
                candidate = self._gather(at)
                if candidate[1] > best[1]:
                    best = candidate
        return best

    def _gather(self, at: int) -> tuple[list[_Waiting], int, int]:
        """The item waiting at `at` and later ones of its model and key, in arrival order, up to its
        model's row limit (a model that does not batch runs each item alone): items, rows, limit."""
        head = self._waiting[at]
        options = head.runner.spec.options
        limit = options.max_batch_size if options.batches() else 1
        group, rows = [head], head.rows
        for w in self._waiting[at + 1:]:
            if rows >= limit:
                break
            if w.model == head.model and w.key == head.key and rows + w.rows <= limit:
                group.append(w)
                rows += w.rows
        return group, rows, limit

    def _run(self, group: list[_Waiting]) -> None:
        if isinstance(group[0].runner, ContinuousRunner):
            self._serve(group)
            return
        model = group[0].model
        started = time.perf_counter()
        outcomes = self._outcomes(group)
        seconds = time.perf_counter() - started
        stats = self.stats.setdefault(model, BatchStats())
        rows = sum(w.rows for w in group)
        stats.batches += 1
        stats.items += len(group)
        stats.rows += rows
        stats.seconds += seconds
        stats.largest = max(stats.largest, rows)
        log.debug("batch of %d job(s), %d row(s) on %s in %.2fs", len(group), rows, model, seconds)
        for w, outcome in zip(group, outcomes, strict=True):
            w.outcome = outcome
            w.done.set()

    def _serve(self, group: list[_Waiting]) -> None:
        """A continuous runner: the group starts a running batch that takes in more of its model's
        waiting items as rows free up, and hands each outcome back as soon as it is known. It stops
        taking items once another model's item has waited that model's max_wait_ms, so a worker
        serving several models moves on when the running batch drains."""
        first = group[0]
        runner = first.runner
        assert isinstance(runner, ContinuousRunner)
        stats = self.stats.setdefault(first.model, BatchStats())
        stats.batches += 1
        members = {id(w.item): w for w in group}
        stats.largest = max(stats.largest, sum(w.rows for w in group))
        started = time.perf_counter()

        def pull(choose: Choose) -> list[BatchItem]:
            with self._cond:
                now = time.monotonic()
                if any(w.model != first.model and now - w.arrived >= w.runner.spec.options.max_wait_ms / 1000
                       for w in self._waiting):
                    return []
                offered = [w for w in self._waiting if w.model == first.model and w.key == first.key]
                chosen = {id(it) for it in choose([(w.item, now - w.arrived) for w in offered])} if offered else set()
                taken = [w for w in offered if id(w.item) in chosen]
                for w in taken:
                    self._waiting.remove(w)
                    members[id(w.item)] = w
                stats.largest = max(stats.largest, sum(w.rows for w in members.values()))
            return [w.item for w in taken]

        def deliver(item: BatchItem, outcome: Outcome) -> None:
            w = members.pop(id(item))
            stats.items += 1
            stats.rows += w.rows
            w.outcome = outcome
            w.done.set()

        try:
            runner.serve([w.item for w in group], pull, deliver)
        except BaseException as exc:  # noqa: BLE001 - the undelivered items retry in smaller groups
            left = list(members.values())
            members.clear()
            log.warning("a running batch on %s failed (%s: %s); retrying its %d undelivered job(s)",
                        first.model, type(exc).__name__, exc, len(left))
            if left:
                for w, outcome in zip(left, self._outcomes(left), strict=True):
                    stats.items += 1
                    stats.rows += w.rows
                    w.outcome = outcome
                    w.done.set()
        finally:
            stats.seconds += time.perf_counter() - started
        for w in members.values():  # a runner that returned without delivering them
            w.outcome = RuntimeError(f"{first.model}'s runner returned without an outcome for this job")
            w.done.set()

    def _outcomes(self, group: list[_Waiting]) -> list[Outcome]:
        runner = group[0].runner
        try:
            outcomes = list(runner.run_batch([w.item for w in group]))
            if len(outcomes) != len(group):
                raise RuntimeError(f"runner returned {len(outcomes)} outcomes for {len(group)} items")
            return outcomes
        except BaseException as exc:  # noqa: BLE001 - becomes an outcome; the executor must live on
            if len(group) == 1 or not isinstance(exc, Exception):
                return [exc] * len(group)
            stats = self.stats.setdefault(group[0].model, BatchStats())
            stats.splits += 1
            log.warning("a batch of %d job(s) on %s failed (%s: %s); retrying in halves",
                        len(group), group[0].model, type(exc).__name__, exc)
            half = len(group) // 2
            return self._outcomes(group[:half]) + self._outcomes(group[half:])
