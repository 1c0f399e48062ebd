"""The Postgres pool pings only connections that sat idle: one used a moment ago is handed out
as it is (a ping per checkout was a round trip per unit of work), and one idle for longer that
died meanwhile is replaced before anyone uses it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from genq.shared import db

pytestmark = pytest.mark.integration


def _pinging(monkeypatch: pytest.MonkeyPatch, engine: Any) -> list[int]:
    pings: list[int] = []
    real = engine.dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(1)
        return bool(real(dbapi_conn))

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def _backend(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_in_use_a_moment_ago_is_not_pinged(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(pg_url)
    pings = _pinging(monkeypatch, engine)
    first = _backend(engine)
    assert [_backend(engine) for _ in range(5)] == [first] * 5  # the same pooled connection
    assert pings == []
    monkeypatch.setattr(db, "PING_IDLE_S", 0.0)  # now every checkout finds it idle
    assert _backend(engine) == first
    assert pings == [1]
    engine.dispose()


def test_an_idle_connection_that_died_is_replaced_before_use(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(pg_url)
    dead = _backend(engine)
    admin = db.make_engine(pg_url)
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dead}).scalar_one()
    admin.dispose()
    monkeypatch.setattr(db, "PING_IDLE_S", 0.0)
    assert _backend(engine) != dead  # no error: the ping found it dead and the pool connected anew
    engine.dispose()
