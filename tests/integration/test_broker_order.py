"""genq's messages on a real Redis: the order a queue hands them out in (most urgent priority
first, and within one priority a job that already waited ahead of new work), and the broker's
epoch, which tells genq that Redis lost its data."""

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


def _publisher(redis_url: str, tmp_path: Path) -> CeleryPublisher:
    settings = build_settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/g.db",
                              storage_url=f"file://{tmp_path}/obj")
    return CeleryPublisher(make_celery(settings))


def test_recovered_jobs_go_ahead_of_new_work_of_their_priority_only(redis_url: str, tmp_path: Path) -> None:
    publisher = _publisher(redis_url, tmp_path)
    model = f"order-{uuid.uuid4().hex[:6]}"
    publisher.publish([Publish("new-1", model, 5), Publish("new-2", model, 5), Publish("urgent", model, 9)])
    publisher.publish([Publish("back-1", model, 5, front=True), Publish("back-2", model, 5, front=True),
                       Publish("new-3", model, 5), Publish("low-back", model, 1, front=True)])
    assert _drain(publisher, model) == ["urgent", "back-1", "back-2", "new-1", "new-2", "new-3", "low-back"]


def test_the_epoch_moves_when_redis_loses_its_data(tmp_path: Path) -> None:
    """A private server of its own: the session's Redis is not flushed under other tests."""
    import redis

    from tests.support.servers import PrivateRedis

    server = PrivateRedis()
    server.start()
    try:
        publisher = _publisher(server.url, tmp_path)
        publisher.publish([Publish("j1", "m")])
        before = publisher.epoch()
        assert before is not None and publisher.epoch() == before  # stable while the data lasts
        redis.Redis(port=server.port).flushall()
        publisher.publish([Publish("j2", "m")])  # new traffic writes the new epoch with its message
        after = publisher.epoch()
        assert after is not None and after > before
    finally:
        server.kill()


def test_a_consumer_with_room_takes_what_waits_in_one_go_in_queue_order_and_loses_none(
        redis_url: str, tmp_path: Path) -> None:
    """The prefetch is filled after one BRPOP (redis_transport's take): in the order the queue
    hands messages out, each recorded as unacknowledged, and the unacknowledged ones go back to
    the queue when the consumer closes."""
    import redis
    from kombu import Consumer, Exchange, Queue

    publisher = _publisher(redis_url, tmp_path)
    model = f"take-{uuid.uuid4().hex[:6]}"
    publisher.publish([Publish("new-1", model, 5), Publish("new-2", model, 5), Publish("urgent", model, 9),
                       Publish("low", model, 1)])
    publisher.publish([Publish("back", model, 5, front=True)])
    unacked = redis.Redis.from_url(redis_url)
    name = queue_name(model)
    received: list[tuple[str, object]] = []
    with publisher.app.connection_for_read() as conn:
        consumer = Consumer(conn.default_channel, [Queue(name, Exchange(name), routing_key=name)],
                            callbacks=[lambda body, message: received.append((body[0][0], message))])
        consumer.qos(prefetch_count=4)
        with consumer:
            conn.drain_events(timeout=5)  # one BRPOP's worth of events
            assert [job for job, _ in received] == ["urgent", "back", "new-1", "new-2"]  # "low" finds no room
            tags = [m.delivery_tag for _, m in received]
            assert all(unacked.hexists("unacked", tag) for tag in tags)
            for _, message in received[:2]:
                message.ack()
            assert [unacked.hexists("unacked", tag) for tag in tags] == [False, False, True, True]
    # Closing the channel gave the two unacknowledged back (in kombu's order for restored messages).
    assert sorted(_drain(publisher, model)) == ["low", "new-1", "new-2"]


def test_acks_in_an_event_loop_are_written_together_before_it_polls_again_and_at_close(
        redis_url: str, tmp_path: Path) -> None:
    """redis_transport defers a worker's acks to its event loop's next tick: acked messages stay
    in the unacked index until then, leave it together, and those acked after the last tick leave
    it when the channel closes (none is restored to the queue)."""
    import redis
    from kombu import Consumer, Exchange, Queue
    from kombu.asynchronous import Hub

    publisher = _publisher(redis_url, tmp_path)
    model = f"acks-{uuid.uuid4().hex[:6]}"
    publisher.publish([Publish(f"j{i}", model) for i in range(4)])
    unacked = redis.Redis.from_url(redis_url)
    name = queue_name(model)
    received: list[object] = []
    hub = Hub()
    with publisher.app.connection_for_read() as conn:
        conn.transport.register_with_event_loop(conn.connection, hub)
        flush = next(f for f in hub.on_tick if f.__name__ == "flush_acks")
        consumer = Consumer(conn.default_channel, [Queue(name, Exchange(name), routing_key=name)],
                            callbacks=[lambda body, message: received.append(message)])
        consumer.qos(prefetch_count=4)
        with consumer:
            flush()  # the loop's first tick: from now on acks wait for a tick
            conn.drain_events(timeout=5)
            tags = [m.delivery_tag for m in received]  # type: ignore[attr-defined]
            assert len(tags) == 4
            for message in received[:3]:
                message.ack()  # type: ignore[attr-defined]
            assert all(unacked.hexists("unacked", tag) for tag in tags)  # not written yet
            flush()
            assert [unacked.hexists("unacked", tag) for tag in tags] == [False, False, False, True]
            received[3].ack()  # type: ignore[attr-defined]
    assert not any(unacked.hexists("unacked", tag) for tag in tags)
    assert not any(unacked.zscore("unacked_index", tag) for tag in tags)
    assert _drain(publisher, model) == []  # the ones acked were not given back
    hub.close()
