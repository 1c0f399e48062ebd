"""What the routes share about a tenant's resources: "get owned or 404", cursor pages, and the
create pattern (idempotency, the thread pool, a same-key race) that every create route runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from genq.services import idempotency
from genq.services.errors import not_found


class Owned(Protocol):
    id: Any
    tenant: Any


R = TypeVar("R", bound=Owned)
T = TypeVar("T")


def get_owned(session: Session, model: type[R], ident: str, tenant: str | None, what: str) -> R:
    """The tenant's row `ident`, or 404 (another tenant's row is as absent as a missing one)."""
    row = session.get(model, ident)
    if row is None or row.tenant != tenant:
        raise not_found(what, ident)
    return row


async def read_once(sessions: sessionmaker[Session], read: Callable[[Session], T]) -> T:
    """Run `read` with a session of its own in one trip through the thread pool, closing the
    session there. For the status reads clients poll: a route with the session dependency costs
    three trips (the dependency's enter and exit run in threads of their own), each a wait for a
    thread and a CPU on a busy machine."""

    def run() -> T:
        with sessions() as session:
            return read(session)

    return await run_in_threadpool(run)


def list_page(data: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object: the page, its first and last ids, and whether more follow."""
    return {"object": "list", "data": list(data), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def cursor_page(session: Session, query: Select[Any], id_column: Any, *, after: str | None, limit: int,
                view: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Newest first (ids sort by creation time); `after` is the last id of the previous page."""
    if after:
        query = query.where(id_column < after)
    rows = session.execute(query.order_by(id_column.desc()).limit(limit + 1)).scalars().all()
    return list_page([view(r) for r in rows[:limit]], len(rows) > limit)


@dataclass(frozen=True)
class Once:
    """One create request's idempotency: `remember(id)` records the created object's id in the
    transaction that creates it, so a repeat of the request answers that object."""

    session: Session
    tenant: str | None
    key: str | None
    fingerprint: str
    object_type: str

    def remember(self, object_id: str) -> None:
        idempotency.remember(self.session, self.tenant, self.key, self.fingerprint, self.object_type, object_id)


async def create_once(request: Request, session: Session, tenant: str | None, object_type: str,
                      content: Iterable[bytes], make: Callable[[Once], T], replay: Callable[[str], T]) -> T:
    """The create pattern. With an `Idempotency-Key`, a repeat of the same request (same key, path
    and `content`) answers `replay(id of the first one's object)`; the same key with another
    request is a 409. `make` creates the object (and calls `once.remember`) in the thread pool, so
    no database call runs on the event loop; when a concurrent request with the same key commits
    first, its object is the answer."""
    key = idempotency.request_key(request)
    once: list[Once] = []

    def run() -> T:
        # Hashing runs here too: `content` may stream a large upload from its spooled file.
        once.append(Once(session, tenant, key, idempotency.fingerprint(request, content), object_type))
        prior = idempotency.replayed(session, tenant, key, once[0].fingerprint, object_type)
        return replay(prior) if prior is not None else make(once[0])

    try:
        return await run_in_threadpool(run)
    except IntegrityError as exc:
        lost_race = exc

    def winner() -> T:
        return replay(idempotency.race_winner(session, tenant, key, once[0].fingerprint, object_type, lost_race))

    return await run_in_threadpool(winner)
