"""Jobs that already lost a worker run alone.

A worker holds several jobs at once (its concurrency), so a job that kills its process (out of
memory, a crashing kernel) takes the others it held down with it, and each of them loses an
attempt. Held again together with it on the next try, they would all run out of attempts with
it. So a job whose claim shows an earlier start that did not finish (attempts > 1) waits until no
other job is held, and no new job is claimed until it is done: if it kills the worker again, it
is the only one that pays. The jobs it took down once run alone in turn, and then succeed; one
claimed while another runs alone goes back to the queue without using up an attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Isolation:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = 0  # jobs claimed (or being claimed) and not yet done
        self._alone = False  # whether a job runs alone or waits to

    @contextmanager
    def held(self) -> Iterator[None]:
        """Around claiming and running one job: waits while a job runs alone or waits to."""
        with self._cond:
            while self._alone:
                self._cond.wait()
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[bool]:
        """Inside held(): wait until no other job is held, then yield True. Yields False at once
        if another job runs alone or waits to: two such jobs must not be held together, so the
        caller hands its job back, unstarted, to be run later (here or elsewhere)."""
        with self._cond:
            first = not self._alone
            if first:
                self._alone = True
                self._held -= 1  # the others in held() wait now; those held already finish
                while self._held:
                    self._cond.wait()
                self._held += 1
        try:
            yield first
        finally:
            if first:
                with self._cond:
                    self._alone = False
                    self._cond.notify_all()
