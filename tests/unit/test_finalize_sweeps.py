"""Batch finalization and expiry sweeps, on SQLite and file storage: every batch is reached
however many there are, and a finalization that storage refused is taken up again at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from genq.shared.db import Batch, Job, new_id, session_factory, session_scope
from genq.shared.finalize import expire_batches, finalize_stale_batches, maybe_finalize_batch
from genq.shared.migrate import upgrade
from genq.shared.storage import FileStorage, StorageUnavailable

MANY = 150  # more than one page of a sweep


class UnreachableStorage(FileStorage):
    """File storage that refuses writes while `down`, as S3 does during an outage."""

    down = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if self.down:
            raise StorageUnavailable("object storage cannot be reached")
        super().put(key, data, content_type)


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/g.db"
    upgrade(url)
    return session_factory(url)


def add_batches(sessions: sessionmaker[Session], n: int, *, job_status: str = "succeeded",
                expires_in: float = 3600) -> list[str]:
    """`n` in-progress batches of one job each, oldest first."""
    now = time.time()
    ids = []
    with session_scope(sessions) as s:
        for i in range(n):
            batch_id = new_id("batch")
            s.add(Batch(id=batch_id, endpoint="/v1/completions", status="in_progress", total=1,
                        created_at=now + i * 1e-3, in_progress_at=now, expires_at=now + expires_in))
            s.add(Job(id=new_id("job"), batch_id=batch_id, url="/v1/completions", model="echo",
                      body={"model": "echo", "prompt": "x"}, status=job_status, created_at=now,
                      result={"choices": []} if job_status == "succeeded" else None))
            ids.append(batch_id)
    return ids


def statuses(sessions: sessionmaker[Session], ids: list[str]) -> list[str]:
    with session_scope(sessions) as s:
        found = dict(s.execute(select(Batch.id, Batch.status).where(Batch.id.in_(ids))).all())
    return [found[i] for i in ids]


def test_the_stale_sweep_finalizes_every_batch_that_missed_its_finalization(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    ids = add_batches(sessions, MANY)
    finalized = finalize_stale_batches(sessions, FileStorage(tmp_path / "obj"))
    assert finalized == sorted(ids)  # all of them, oldest (smallest id) first
    assert statuses(sessions, ids) == ["completed"] * MANY


def test_the_expiry_sweep_expires_every_batch_past_its_window(sessions: sessionmaker[Session],
                                                               tmp_path: Path) -> None:
    ids = add_batches(sessions, MANY, job_status="queued", expires_in=-1)
    assert expire_batches(sessions, FileStorage(tmp_path / "obj")) == sorted(ids)
    assert statuses(sessions, ids) == ["expired"] * MANY


def test_a_finalization_storage_refused_is_done_by_the_next_sweep(sessions: sessionmaker[Session],
                                                                 tmp_path: Path) -> None:
    [batch_id] = add_batches(sessions, 1)
    storage = UnreachableStorage(tmp_path / "obj")
    assert maybe_finalize_batch(sessions, storage, batch_id) is None
    assert statuses(sessions, [batch_id]) == ["in_progress"]  # not left `finalizing` for minutes
    assert finalize_stale_batches(sessions, storage) == []

    storage.down = False
    assert finalize_stale_batches(sessions, storage) == [batch_id]
    with session_scope(sessions) as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.status == "completed"
        assert storage.get(f"files/{batch.output_file_id}.jsonl").count(b"\n") == 1
