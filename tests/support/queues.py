"""Reading what was published to a Celery queue, for tests that check what the API sent."""

from __future__ import annotations

from typing import Any

from celery import Celery


def take_all(app: Celery, queue_name: str, timeout: float = 0.1) -> list[tuple[str, list[Any]]]:
    """Take every message off `queue_name` (acknowledged): (task name, args) in queue order."""
    out = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(queue_name)
        while True:
            try:
                message = queue.get(timeout=timeout)
            except queue.Empty:
                break
            out.append((message.headers["task"], message.payload[0]))
            message.ack()
        queue.close()
    return out
