"""kombu's Redis transport with one addition: a message with the `genq_front` header goes to the
consuming end of its priority list, so it is the next of its priority to be delivered.

kombu emulates priorities with one list per step (`genq.<model>`, `genq.<model>:1`, ...): it
LPUSHes new messages and BRPOPs the lists most urgent first. A job recovered from a dead worker
was waiting before everything now queued, so genq RPUSHes it instead: it goes ahead of new work of
its own priority and still behind more urgent work. The list names are kombu's own, so messages
published by an earlier genq (or a plain kombu client) are consumed as before. genq declares no
queue expiry, so unlike kombu's `_put` this one sets none.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

FRONT_HEADER = "genq_front"


class Channel(kombu_redis.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if not (message.get("headers") or {}).get(FRONT_HEADER):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:  # kombu's pipelined publishing (CeleryPublisher batches its sends)
            batch.add("rpush", key, dumps(message))
            return
        with self.conn_or_acquire() as client:
            client.rpush(key, dumps(message))


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
