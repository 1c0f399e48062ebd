"""Who validates an uploaded batch: the API process that holds its validation lease. Another
process's maintenance leaves a held batch alone and takes over one whose lease ran out (its owner
died mid-validation) or that never got one (its owner died right after recording it)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from genq.services import intake
from genq.services import jobs as jobs_data
from genq.services.intake import VALIDATION_LEASE_S, resume_stale_validations
from genq.shared.db import Batch, session_scope
from tests.support.app import api_client
from tests.support.waiting import wait_for

LINES = b"".join(b'{"custom_id": "c%d", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "p"}}\n'
                 % i for i in range(3))


def _validating_batch(c: TestClient, *, created_ago_s: float = 0.0, lease_left_s: float | None = None) -> str:
    """A `validating` batch as an API process leaves it: recorded, and holding a lease or not."""
    upload = c.post("/v1/files", files={"file": ("in.jsonl", LINES, "application/jsonl")}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    state = c.app.state.genq  # type: ignore[attr-defined]
    with session_scope(state.sessions) as s:
        batch = jobs_data.new_batch(s, endpoint="/v1/completions", tenant=None, status="validating",
                                    input_file_id=upload.json()["id"])
        batch.created_at -= created_ago_s
        if lease_left_s is not None:
            batch.validating_until = time.time() + lease_left_s
        return batch.id


def _status(c: TestClient, batch_id: str) -> str:
    return str(c.get(f"/v1/batches/{batch_id}").json()["status"])


def test_a_held_validation_is_left_to_its_owner_until_the_lease_runs_out(tmp_path: Path) -> None:
    with api_client(tmp_path) as c:
        state = c.app.state.genq  # type: ignore[attr-defined]
        held = _validating_batch(c, created_ago_s=60, lease_left_s=VALIDATION_LEASE_S)
        fresh = _validating_batch(c)  # its creator is about to validate it
        orphan = _validating_batch(c, created_ago_s=VALIDATION_LEASE_S + 1)  # its creator died first
        assert resume_stale_validations(state) == [orphan]
        assert (_status(c, held), _status(c, fresh), _status(c, orphan)) == ("validating", "validating",
                                                                             "in_progress")

        with session_scope(state.sessions) as s:  # the owner stopped renewing: it died
            s.execute(update(Batch).where(Batch.id == held).values(validating_until=time.time() - 0.1))
        assert resume_stale_validations(state) == [held]
        assert c.get(f"/v1/batches/{held}").json()["request_counts"]["total"] == 3


def test_only_one_process_takes_a_validation(tmp_path: Path) -> None:
    with api_client(tmp_path) as c:
        state = c.app.state.genq  # type: ignore[attr-defined]
        batch_id = _validating_batch(c)
        with session_scope(state.sessions) as s:
            assert jobs_data.hold_validation(s, batch_id, lease_s=VALIDATION_LEASE_S)
        with session_scope(state.sessions) as s:
            assert not jobs_data.hold_validation(s, batch_id, lease_s=VALIDATION_LEASE_S)
            assert jobs_data.hold_validation(s, batch_id, lease_s=VALIDATION_LEASE_S, renew=True)


class HeldStorage:
    """Storage whose reads wait until the test lets them through: a validation that takes long."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = threading.Event()

    def get(self, key: str) -> bytes:
        assert self.release.wait(30), "the test never released the read"
        return bytes(self.inner.get(key))


def test_a_long_validation_renews_its_lease_and_is_not_taken_over(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "VALIDATION_LEASE_S", 0.3)
    with api_client(tmp_path) as c:
        state = c.app.state.genq  # type: ignore[attr-defined]
        batch_id = _validating_batch(c, created_ago_s=60)
        storage = HeldStorage(state.storage)
        outcome: list[str] = []
        owner = threading.Thread(target=lambda: outcome.append(
            intake.validate_file_batch(dataclasses.replace(state, storage=storage), batch_id)))
        owner.start()
        try:
            leases: set[float] = set()

            def renewed_twice() -> bool:
                with state.sessions() as s:
                    leases.add(s.get(Batch, batch_id).validating_until or 0.0)
                return len(leases - {0.0}) >= 3

            wait_for(renewed_twice, 10, 0.05, "the owner renewing its lease")
            assert resume_stale_validations(state) == []  # still held: another API leaves it alone
        finally:
            storage.release.set()
            owner.join(10)
        assert outcome == ["in_progress"]
        assert c.get(f"/v1/batches/{batch_id}").json()["request_counts"]["total"] == 3
