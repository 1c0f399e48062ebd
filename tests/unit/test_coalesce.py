"""Group commit (workers/coalesce.py) and running alone (workers/isolation.py): how a worker's job
threads share database round trips, and keep a job that killed a worker away from the others."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from genq.workers.coalesce import Coalescer
from genq.workers.isolation import Isolation
from tests.support.waiting import wait_for


class Writes:
    """A group write that records its groups, can be held open, and fails a group holding -1."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.after: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def write(self, items: list[int]) -> list[int]:
        self.groups.append(items)
        self.entered.set()
        self.release.wait(10)
        if -1 in items:
            raise ValueError("no such job")
        return [10 * i for i in items]


def test_a_lone_item_is_written_at_once_and_those_arriving_meanwhile_together() -> None:
    writes = Writes()
    coalescer = Coalescer(writes.write, after=writes.after.append)
    assert coalescer.submit(1) == 10  # alone: written at once, nothing waited for
    writes.release.clear()
    writes.entered.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(coalescer.submit, 2)
        assert writes.entered.wait(5)  # the write of [2] is under way...
        later = [pool.submit(coalescer.submit, i) for i in (3, 4, 5)]
        wait_for(lambda: len(coalescer._pending) == 3, 5, 0.01, "three items queued behind the write")
        writes.release.set()
        assert [f.result(5) for f in (first, *later)] == [20, 30, 40, 50]  # each thread its own result
    assert writes.groups == [[1], [2], [3, 4, 5]]  # ...and the three that came meanwhile went in one
    assert writes.after == writes.groups
    assert (coalescer.groups, coalescer.items) == (3, 5)


def test_a_failed_write_fails_its_group_only() -> None:
    writes = Writes()
    coalescer = Coalescer(writes.write, after=writes.after.append)
    writes.release.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(coalescer.submit, 1)
        assert writes.entered.wait(5)
        bad: list[Future[int]] = [pool.submit(coalescer.submit, i) for i in (2, -1)]
        wait_for(lambda: len(coalescer._pending) == 2, 5, 0.01, "two items queued behind the write")
        writes.release.set()
        assert first.result(5) == 10
        for f in bad:  # every thread of the failed group gets the error, to retry or report
            with pytest.raises(ValueError, match="no such job"):
                f.result(5)
    assert coalescer.submit(3) == 30  # and the next group is written as usual
    assert writes.after == [[1], [3]]  # `after` follows only writes that succeeded


def test_a_job_that_lost_a_worker_runs_with_no_other_job_held() -> None:
    """It waits for the jobs held with it, no job is claimed while it runs, and a second such job
    held with it is told to go back to the queue instead of waiting its turn held."""
    isolation = Isolation()
    normal_done, release = threading.Event(), threading.Event()
    order: list[str] = []

    def normal() -> None:
        with isolation.held():
            normal_done.wait(10)
            order.append("normal")

    def suspect(name: str, go: threading.Event) -> bool:
        with isolation.held():
            go.wait(10)
            with isolation.alone() as alone:
                if alone:
                    order.append(name)
                    release.wait(10)
                return alone

    def late() -> None:
        with isolation.held():
            order.append("late")

    first_go, second_go = threading.Event(), threading.Event()
    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(normal)
        first = pool.submit(suspect, "first", first_go)
        second = pool.submit(suspect, "second", second_go)
        wait_for(lambda: isolation._held == 3, 5, 0.01, "three jobs held")
        first_go.set()
        wait_for(lambda: isolation._alone, 5, 0.01, "the first waiting to run alone")
        second_go.set()
        assert second.result(5) is False  # told at once: it goes back to the queue
        newcomer = pool.submit(late)
        assert order == []  # the first waits for the normal job; the newcomer for the first
        normal_done.set()
        wait_for(lambda: order == ["normal", "first"], 5, 0.01, "the first running alone")
        release.set()
        assert first.result(5) is True
        held.result(5)
        newcomer.result(5)
    assert order == ["normal", "first", "late"]
