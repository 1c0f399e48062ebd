"""Background upkeep in the API process: work that must happen even when no request arrives.

Every few seconds: re-run validations an earlier API process left unfinished, then the upkeep the
workers run too (genq.shared.upkeep: outbox, lost messages, expiry, stale finalization). Every
run is guarded in the database, so several API replicas can run it side by side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from genq.services.intake import resume_stale_validations
from genq.services.state import AppState
from genq.shared.upkeep import Task, run_tasks, upkeep_tasks

log = logging.getLogger("genq.api")


class Maintenance:
    def __init__(self, state: AppState, period_s: float = 5.0,
                 extra: list[Callable[[], object]] | None = None) -> None:
        self.state = state
        self.period_s = period_s
        self.extra = extra or []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        state = self.state
        run_tasks([Task("resume stale validations", lambda: resume_stale_validations(state)),
                   *upkeep_tasks(state.sessions, state.storage, state.publisher, state.registry.names()),
                   *(Task("extra", task) for task in self.extra)])

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.run_once()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="genq-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
