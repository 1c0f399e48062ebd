"""The fine-tuning task's bookkeeping without a broker (SQLite, file storage, a stand-in trainer):
claiming, recovery of a dead worker's job, failures, hand-back on shutdown, and the metrics
windows. Real training through real workers is in tests/integration/test_fine_tuning_worker.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from genq.shared import fine_tuning_jobs as ft_state
from genq.shared.db import File, FineTuningEvent, FineTuningJob, session_factory, session_scope
from genq.shared.migrate import upgrade
from genq.shared.registry import model_spec
from genq.shared.storage import FileStorage
from genq.workers.fine_tune import FineTuner, TrainingLimits, _Window, claim, requeue_expired_training
from genq.workers.training import Checkpoint, TrainingResult


class Publisher:
    def __init__(self, epoch: float | None = None, down: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.since, self.down = epoch, down

    def publish_fine_tune(self, job_id: str, model: str) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append((job_id, model))

    def epoch(self) -> float | None:
        return self.since


class Registry:
    def get(self, name: str) -> Any:
        return model_spec(name, "text", "/models/none")


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/g.db"
    upgrade(url)
    return session_factory(url)


@pytest.fixture()
def storage(tmp_path: Path) -> FileStorage:
    store = FileStorage(tmp_path / "objects")
    store.put("files/train.jsonl", json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n")
    return store


def add_job(sessions: sessionmaker[Session], job_id: str = "ftjob-1", **values: Any) -> None:
    row = {"tenant": None, "status": "queued", "model": "m", "training_file": "file-1", "seed": 1,
           "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
           "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": None}, "fine_tuned_model": f"ft:m:x:{job_id}",
           "result_files": [], "created_at": time.time(), "attempts": 0, **values}
    with session_scope(sessions) as s:
        if s.get(File, "file-1") is None:
            s.add(File(id="file-1", tenant=None, purpose="fine-tune", filename="t.jsonl", bytes=1,
                       key="files/train.jsonl", created_at=time.time()))
        s.add(FineTuningJob(id=job_id, **row))


def tuner(sessions: sessionmaker[Session], storage: FileStorage, trainer: Any, publisher: Publisher | None = None,
          max_attempts: int = 2) -> FineTuner:
    return FineTuner(sessions, storage, Registry(), publisher or Publisher(),  # type: ignore[arg-type]
                     worker_id="w1", limits=TrainingLimits(lease_s=30, max_attempts=max_attempts, checkpoint_every=2),
                     device="cpu", stopping=threading.Event(), trainer=trainer)


def job(sessions: sessionmaker[Session], job_id: str = "ftjob-1") -> FineTuningJob:
    with sessions() as s:
        row = s.get(FineTuningJob, job_id)
        assert row is not None
        s.expunge(row)
        return row


def messages(sessions: sessionmaker[Session], job_id: str = "ftjob-1") -> list[str]:
    with sessions() as s:
        return [e.message for e in s.query(FineTuningEvent).filter_by(job_id=job_id).order_by(FineTuningEvent.seq)]


def result(**values: Any) -> TrainingResult:
    fields = {"adapter_files": {"adapter_config.json": b'{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}',
                                "adapter_model.safetensors": b"weights"},
              "step": 2, "total_steps": 2, "trained_tokens": 10, "train_loss": 1.0, "valid_loss": None,
              "cancelled": False, "truncated": 0, "hyperparameters": None}
    return TrainingResult(**{**fields, **values})


def test_a_job_is_claimed_once_and_not_after_a_cancel(sessions: sessionmaker[Session]) -> None:
    add_job(sessions)
    add_job(sessions, "ftjob-2", cancel_requested_at=time.time(), status="cancelled")
    with session_scope(sessions) as s:
        assert claim(s, "ftjob-1", worker="w1", lease_s=30) is not None
        assert claim(s, "ftjob-1", worker="w2", lease_s=30) is None  # already running
        assert claim(s, "ftjob-2", worker="w1", lease_s=30) is None
    assert job(sessions).worker == "w1" and job(sessions).attempts == 1


def test_a_dead_worker_s_job_is_queued_again_and_failed_after_its_attempts(sessions: sessionmaker[Session]) -> None:
    past = time.time() - 1
    add_job(sessions, "ftjob-1", status="running", worker="dead", attempts=1, lease_expires_at=past)
    add_job(sessions, "ftjob-2", status="running", worker="dead", attempts=2, lease_expires_at=past)
    add_job(sessions, "ftjob-3", status="running", worker="alive", attempts=1, lease_expires_at=time.time() + 30)
    with session_scope(sessions) as s:
        publish, failed = requeue_expired_training(s, models=["m"], max_attempts=2)
    assert publish == [("ftjob-1", "m")] and failed == ["ftjob-2"]
    assert job(sessions, "ftjob-1").status == "queued" and job(sessions, "ftjob-1").worker is None
    failed_job = job(sessions, "ftjob-2")
    assert failed_job.status == "failed" and failed_job.error["code"] == "worker_lost"  # type: ignore[index]
    assert job(sessions, "ftjob-3").status == "running"


def test_a_trainer_error_fails_the_job_alone(sessions: sessionmaker[Session], storage: FileStorage) -> None:
    add_job(sessions)

    def broken(*_args: Any, **_kw: Any) -> TrainingResult:
        raise ValueError("example 3: the chat template broke")

    assert tuner(sessions, storage, broken).execute("ftjob-1") == "failed"
    row = job(sessions)
    assert row.status == "failed" and "example 3" in row.error["message"]  # type: ignore[index]
    assert messages(sessions)[-1].startswith("The job failed: ValueError: example 3")


def test_a_stopping_worker_saves_a_checkpoint_and_hands_the_job_back(sessions: sessionmaker[Session],
                                                                     storage: FileStorage) -> None:
    add_job(sessions)
    publisher = Publisher()
    ft = tuner(sessions, storage, None, publisher)

    def stopped(*_args: Any, hooks: Any, resume: Any, **_kw: Any) -> TrainingResult:
        assert resume is None
        ft.halt.set()  # a warm shutdown arrives mid-training
        assert hooks.cancelled() is True
        hooks.save_checkpoint(Checkpoint(step=1, epoch=0, position=1, adapter_files=result().adapter_files,
                                         trainer_state=b"state"))
        return result(step=1, cancelled=True)

    ft.trainer = stopped
    assert ft.execute("ftjob-1") == "handed back"
    row = job(sessions)
    assert (row.status, row.worker, row.attempts) == ("queued", None, 0)  # the attempt is given back
    assert publisher.sent == [("ftjob-1", "m")]
    ft.halt.clear()

    def resumed(*_args: Any, resume: Checkpoint | None, **_kw: Any) -> TrainingResult:
        assert resume is not None and (resume.step, resume.trainer_state) == (1, b"state")
        return result()

    ft.trainer = resumed
    assert ft.execute("ftjob-1") == "succeeded"
    assert "Fine-tuning job resumed from step 1 on w1" in messages(sessions)


def test_metrics_windows_cover_every_step_since_the_last_event() -> None:
    window = _Window()
    window.add({"trained_tokens": 10, "tokens_per_s": 5.0, "train_loss": 2.0})
    assert window.take() == {"train_loss": 2.0, "tokens_per_s": 5.0}
    window.add({"trained_tokens": 30, "tokens_per_s": 10.0, "train_loss": 1.0})  # 20 tokens in 2 s
    window.add({"trained_tokens": 40, "tokens_per_s": 5.0, "train_loss": 4.0})  # 10 tokens in 2 s
    assert window.take() == {"train_loss": pytest.approx(2.0), "tokens_per_s": pytest.approx(7.5)}


def test_queued_jobs_whose_message_never_went_or_was_lost_are_published_again(sessions: sessionmaker[Session]) -> None:
    now = time.time()
    add_job(sessions, "ftjob-1", created_at=now - 60)  # its publish failed a minute ago
    add_job(sessions, "ftjob-2", created_at=now)  # just created: its publish may still be on the way
    add_job(sessions, "ftjob-3", created_at=now - 60, published_at=now - 50)  # sent before the broker restarted
    add_job(sessions, "ftjob-4", created_at=now - 60, published_at=now - 5)  # sent since: still there
    add_job(sessions, "ftjob-5", created_at=now - 60, status="cancelled")
    assert ft_state.sweep_unpublished(sessions, Publisher(down=True), ["m"]) == 0  # broker down: next time
    assert job(sessions, "ftjob-1").published_at is None
    publisher = Publisher(epoch=now - 10)
    assert ft_state.sweep_unpublished(sessions, publisher, ["m"]) == 2
    assert sorted(publisher.sent) == [("ftjob-1", "m"), ("ftjob-3", "m")]
    assert job(sessions, "ftjob-1").published_at >= now  # type: ignore[operator]
    assert ft_state.sweep_unpublished(sessions, Publisher(epoch=now - 10), ["m"]) == 0  # nothing left to send
