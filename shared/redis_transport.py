"""kombu's Redis transport with two additions genq's recovery relies on:

- a message with the `genq_front` header goes to the consuming end of its priority list, so it is
  the next of its priority to be delivered. kombu emulates priorities with one list per step
  (`genq.<model>`, `genq.<model>:1`, ...): it LPUSHes new messages and BRPOPs the lists most
  urgent first. A job recovered from a dead worker was waiting before everything now queued, so
  genq RPUSHes it instead: it goes ahead of new work of its own priority and still behind more
  urgent work. The list names are kombu's own, so messages published by an earlier genq (or a
  plain kombu client) are consumed as before.
- every publish also sets EPOCH_KEY if it is missing, in the same pipeline as the message: when
  the broker's present data began. A broker that lost its data (FLUSHALL, a restart without
  persistence) lost the key with the messages, so the next publish writes a later time, and every
  job still queued that was published before that time has lost its message.

genq declares no queue expiry, so unlike kombu's `_put` this one sets none.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

FRONT_HEADER = "genq_front"
EPOCH_KEY = "genq:epoch"  # a Unix time, as text


class Channel(kombu_redis.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        push = "rpush" if (message.get("headers") or {}).get(FRONT_HEADER) else "lpush"
        payload, now = dumps(message), repr(time.time())
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:  # kombu's pipelined publishing (CeleryPublisher batches its sends)
            batch.add("setnx", EPOCH_KEY, now)
            batch.add(push, key, payload)
            return
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            getattr(pipe.setnx(EPOCH_KEY, now), push)(key, payload)
            pipe.execute()


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


def read_epoch(client: Any) -> float:
    """When the broker's present data began, starting it now if the broker has none (it is new,
    or lost its data and nothing was published since)."""
    with client.pipeline() as pipe:  # one round trip
        _, value = pipe.setnx(EPOCH_KEY, repr(time.time())).get(EPOCH_KEY).execute()
    return float(value)
