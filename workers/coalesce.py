"""Group commit: what many job threads each hand in is written to the database together.

A job thread calls `submit(item)` and gets its own item's result back. If no write is under way
it writes at once, alone, and waits for nothing; while one is under way, the items handed in
meanwhile queue up, and when it ends one of their threads (the leader) takes all of them and
writes them in one call. So a lone job pays one round trip, as before, and under load the group
grows to whatever arrived during the previous write: claims, outcomes and batch checks of a
worker's jobs cost a round trip per group, not per job.

If the write raises, every item of the group gets that error, and each thread decides for itself
what to do (retry_unavailable retries it, joining whatever group is forming then). Work that must
follow a committed write but need not hold up its threads (checking whether their batches are
done) is `after`: the leader runs it once the group's threads have their results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Ticket(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class Coalescer(Generic[T, R]):
    def __init__(self, write: Callable[[list[T]], list[R]],
                 after: Callable[[list[T]], None] | None = None) -> None:
        """`write` takes a group of items and returns one result per item, in their order;
        `after` takes the items of a group written without error."""
        self._write, self._after = write, after
        self._cond = threading.Condition()
        self._pending: list[_Ticket[T, R]] = []
        self._busy = False
        self.groups = self.items = 0  # how well items were grouped (the worker logs it at exit)

    def submit(self, item: T) -> R:
        ticket: _Ticket[T, R] = _Ticket(item)
        with self._cond:
            self._pending.append(ticket)
            while self._busy and not ticket.done:
                self._cond.wait()
            if not ticket.done:  # lead: write everything pending, this item included
                group, self._pending, self._busy = self._pending, [], True
        if not ticket.done:
            self._lead(group)
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    def _lead(self, group: list[_Ticket[T, R]]) -> None:
        error: BaseException | None = None
        results: list[R] = []
        try:
            results = self._write([t.item for t in group])
            if len(results) != len(group):
                raise RuntimeError(f"a group write returned {len(results)} results for {len(group)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every thread of the group
            error = exc
        with self._cond:
            for i, t in enumerate(group):
                t.done, t.error = True, error
                if error is None:
                    t.result = results[i]
            self._busy = False
            self.groups += 1
            self.items += len(group)
            self._cond.notify_all()
        if error is None and self._after is not None:
            self._after([t.item for t in group])
