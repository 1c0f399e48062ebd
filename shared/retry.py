"""Retrying one unit of work with backoff while a dependency is unavailable (the database,
object storage), for up to a deadline. Each dependency says which errors are worth waiting out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_before_delay, wait_exponential

T = TypeVar("T")


def retry_while(transient: Callable[[BaseException], bool], fn: Callable[[], T], *, what: str,
                logger: logging.Logger, dependency: str, deadline_s: float = 60.0,
                first_delay_s: float = 0.2, max_delay_s: float = 5.0) -> T:
    """Run `fn`, retrying while it raises an error `transient` accepts, for up to `deadline_s`.
    `fn` must be safe to run again (its own transaction, guarded writes, an idempotent put).

    The waits double from `first_delay_s` up to `max_delay_s`; no wait runs past the deadline
    (stop_before_delay), and the last error is raised as it is. Each retry is logged with the
    error's type only (its message may name hosts)."""

    def warn(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cause = getattr(exc, "orig", None) or getattr(exc, "__cause__", None) or exc
        logger.warning("%s unavailable while %s (%s); retrying in %.1fs", dependency, what,
                       type(cause).__name__, state.upcoming_sleep)

    retrying = Retrying(retry=retry_if_exception(transient),
                        wait=wait_exponential(multiplier=first_delay_s, max=max_delay_s),
                        stop=stop_before_delay(deadline_s), before_sleep=warn, reraise=True)
    return retrying(fn)
