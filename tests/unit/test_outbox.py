"""The publish outbox and the database-retry helper, on SQLite with a stand-in broker: a job
recorded while the broker is down is published later, exactly what was unpublished is swept, and a
queue that lost its messages gets them again."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from genq.services import jobs as records
from genq.services.validation import validate_batch
from genq.shared import jobs as jd
from genq.shared import outbox
from genq.shared.broker import Publish
from genq.shared.db import Job, retry_unavailable, session_factory, session_scope
from genq.shared.migrate import upgrade
from genq.shared.registry import parse_registry

REG = parse_registry('[models.m]\nkind = "text"\nsource = "x"\n', Path("."))


class StandInBroker:
    """Records what is published; `down` makes every call fail like an unreachable Redis, and
    `fails_after` has it go down once that many messages went out."""

    def __init__(self, fails_after: int | None = None) -> None:
        self.down = False
        self.fails_after = fails_after
        self.sent: list[str] = []
        self.waiting = 0
        self.began: float | None = None  # when its data began, for a broker that can tell (Redis)

    def publish(self, items: Iterable[Publish]) -> int:
        if self.down:
            raise ConnectionError("broker unreachable")
        ids = [i.job_id for i in items]
        for job_id in ids:
            if self.fails_after is not None and len(self.sent) >= self.fails_after:
                raise ConnectionError("broker went away mid-publish")
            self.sent.append(job_id)
        return len(ids)

    def ping(self) -> None:
        pass

    def pending(self, model: str) -> int | None:
        if self.down:
            raise ConnectionError("broker unreachable")
        return self.waiting

    def epoch(self) -> float | None:
        if self.down:
            raise ConnectionError("broker unreachable")
        return self.began


@pytest.fixture()
def factory(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/o.db"
    upgrade(url)
    return session_factory(url)


def _jobs(factory: sessionmaker[Session], n: int = 3) -> list[Publish]:
    lines, errors = validate_batch(
        [(i + 1, {"custom_id": f"c{i}", "url": "/v1/completions", "body": {"model": "m", "prompt": f"p{i}"}})
         for i in range(n)], REG, max_lines=5000)
    assert not errors
    with session_scope(factory) as s:
        _, pubs = records.create_batch(s, lines=lines, endpoint="/v1/completions", tenant=None)
    return pubs


def _unpublished(factory: sessionmaker[Session]) -> set[str]:
    with factory() as s:
        return set(s.execute(select(Job.id).where(Job.published_at.is_(None))).scalars())


def test_a_down_broker_leaves_jobs_for_the_sweeper(factory: sessionmaker[Session]) -> None:
    broker = StandInBroker()
    pubs = _jobs(factory)
    ids = {p.job_id for p in pubs}
    assert _unpublished(factory) == ids  # new jobs start unpublished

    broker.down = True
    assert outbox.publish_and_mark(factory, broker, pubs) is False
    assert outbox.sweep_unpublished(factory, broker, grace_s=0) == 0  # still down: rolled back
    assert _unpublished(factory) == ids

    broker.down = False
    assert outbox.sweep_unpublished(factory, broker, grace_s=60) == 0  # too young: its creator may be publishing
    assert outbox.sweep_unpublished(factory, broker, grace_s=0, models=["other"]) == 0
    assert outbox.sweep_unpublished(factory, broker, grace_s=0) == 3
    assert sorted(broker.sent) == sorted(ids) and _unpublished(factory) == set()
    assert outbox.sweep_unpublished(factory, broker, grace_s=0) == 0  # nothing twice


def test_published_jobs_are_marked(factory: sessionmaker[Session]) -> None:
    broker = StandInBroker()
    pubs = _jobs(factory, 2000)  # more than one UPDATE chunk
    assert outbox.publish_and_mark(factory, broker, pubs) is True
    assert _unpublished(factory) == set() and len(broker.sent) == 2000
    assert outbox.sweep_unpublished(factory, broker, grace_s=0) == 0


def test_a_publish_cut_short_marks_what_went_out(factory: sessionmaker[Session]) -> None:
    """An API that dies (here: a broker that fails) half-way through publishing a large batch
    leaves unpublished only what did not go out, so the sweeper does not send everything twice."""
    broker = StandInBroker(fails_after=1500)
    pubs = _jobs(factory, 3000)
    assert outbox.publish_and_mark(factory, broker, pubs) is False
    assert len(broker.sent) == 1500
    assert _unpublished(factory) == {p.job_id for p in pubs} - set(broker.sent)


def test_one_sweep_goes_through_every_page(factory: sessionmaker[Session]) -> None:
    """A backlog larger than one page is published in one upkeep pass, not one page per pass."""
    broker = StandInBroker()
    pubs = _jobs(factory, 2500)
    assert outbox.sweep_unpublished(factory, broker, grace_s=0) == 2500
    assert sorted(broker.sent) == sorted(p.job_id for p in pubs) and _unpublished(factory) == set()
    assert outbox.sweep_unpublished(factory, broker, grace_s=0, budget_s=0) == 0


def test_lost_messages_are_published_again_only_when_the_queue_is_empty(factory: sessionmaker[Session]) -> None:
    broker = StandInBroker()
    pubs = _jobs(factory)
    outbox.publish_and_mark(factory, broker, pubs)
    with session_scope(factory) as s:  # one job is running: it needs no message
        jd.claim_job(s, pubs[0].job_id, worker="A", lease_s=30)
    broker.sent.clear()

    broker.waiting = 2
    assert outbox.republish_lost(factory, broker, ["m"], after_s=-1) == 0
    assert outbox.republish_lost(factory, broker, ["m"], after_s=60) == 0
    broker.waiting = 0
    assert outbox.republish_lost(factory, broker, ["m"], after_s=60) == 0  # published too recently
    assert outbox.republish_lost(factory, broker, ["m"], after_s=-1) == 2
    assert sorted(broker.sent) == sorted(p.job_id for p in pubs[1:])
    broker.down = True
    assert outbox.republish_lost(factory, broker, ["m"], after_s=-1) == 0  # deferred, not raised


def test_a_broker_that_lost_its_data_gets_the_queued_jobs_again_while_busy(factory: sessionmaker[Session]) -> None:
    """After a FLUSHALL the queue refills with new work at once, so it is never empty; the broker's
    epoch tells which queued jobs were published before the loss, and each goes out once more."""
    import time

    broker = StandInBroker()
    old = _jobs(factory, 3)
    outbox.publish_and_mark(factory, broker, old)
    with session_scope(factory) as s:  # one job is running: it needs no message
        jd.claim_job(s, old[0].job_id, worker="A", lease_s=30)
    broker.began = time.time()  # the broker lost its data; new traffic keeps its queue busy
    new = _jobs(factory, 2)
    outbox.publish_and_mark(factory, broker, new)
    broker.sent.clear()
    broker.waiting = 50

    assert outbox.republish_lost(factory, broker, ["m"]) == 2
    assert sorted(broker.sent) == sorted(p.job_id for p in old[1:])
    assert outbox.republish_lost(factory, broker, ["m"]) == 0  # once, not on every pass


def test_handed_back_and_recovered_jobs_count_as_unpublished(factory: sessionmaker[Session]) -> None:
    broker = StandInBroker()
    a, b, _ = pubs = _jobs(factory)
    outbox.publish_and_mark(factory, broker, pubs)
    with session_scope(factory) as s:
        jd.claim_job(s, a.job_id, worker="A", lease_s=30)
        jd.claim_job(s, b.job_id, worker="B", lease_s=-1)
    with session_scope(factory) as s:
        assert jd.release_job(s, a.job_id, worker="A")
        requeued, _ = jd.requeue_expired(s, models=["m"])
    assert [p.job_id for p in requeued] == [b.job_id]
    assert _unpublished(factory) == {a.job_id, b.job_id}


def test_retry_unavailable_rides_out_a_database_outage() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return "done"

    assert retry_unavailable(flaky, what="test", first_delay_s=0.01) == "done" and len(calls) == 3

    def broken() -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):  # not an outage: no retry
        retry_unavailable(broken, what="test", first_delay_s=0.01)

    def down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        retry_unavailable(down, what="test", deadline_s=0.05, first_delay_s=0.01)


def test_retry_unavailable_backs_off_exponentially_up_to_its_cap(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import time

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 8:
            raise OperationalError("UPDATE jobs", {}, ConnectionRefusedError("connection refused"))
        return "done"

    with caplog.at_level("WARNING", logger="genq.db"):
        assert retry_unavailable(flaky, what="claiming job job_1") == "done"
    assert slept == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert caplog.messages[0] == ("database unavailable while claiming job job_1 (ConnectionRefusedError); "
                                  "retrying in 0.2s")
    assert len(caplog.messages) == 8


def test_api_answers_503_when_the_database_is_down(tmp_path: Path) -> None:
    from tests.support.app import api_client

    with api_client(tmp_path, migrate=False, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none") as c:
        resp = c.post("/v1/jobs", json={"url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "x"}})
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "database_unavailable"
    assert resp.json()["error"]["type"] == "service_unavailable"
    assert resp.headers["Retry-After"]
