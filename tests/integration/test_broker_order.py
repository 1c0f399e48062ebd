"""The order a Redis queue hands out genq's messages in: most urgent priority first, and within
one priority a job that already waited (recovered from a dead worker) ahead of new work."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from genq.shared.broker import CeleryPublisher, Publish, make_celery, queue_name
from genq.shared.config import build_settings

pytestmark = pytest.mark.integration


def _drain(publisher: CeleryPublisher, model: str) -> list[str]:
    """Job ids in the order a consumer of the model's queue receives them."""
    got: list[str] = []
    with publisher.app.connection_for_read() as conn:
        while (message := conn.default_channel.basic_get(queue_name(model), no_ack=True)) is not None:
            args, _kwargs, _embed = message.decode()
            got.append(args[0])
    return got


def test_recovered_jobs_go_ahead_of_new_work_of_their_priority_only(redis_url: str, tmp_path: Path) -> None:
    settings = build_settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/g.db",
                              storage_url=f"file://{tmp_path}/obj")
    publisher = CeleryPublisher(make_celery(settings))
    model = f"order-{uuid.uuid4().hex[:6]}"
    publisher.publish([Publish("new-1", model, 5), Publish("new-2", model, 5), Publish("urgent", model, 9)])
    publisher.publish([Publish("back-1", model, 5, front=True), Publish("back-2", model, 5, front=True),
                       Publish("new-3", model, 5), Publish("low-back", model, 1, front=True)])
    assert _drain(publisher, model) == ["urgent", "back-1", "back-2", "new-1", "new-2", "new-3", "low-back"]
