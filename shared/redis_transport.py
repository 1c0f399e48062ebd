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

- a worker that may hold more messages (prefetch) takes them in one round trip after each BRPOP,
  instead of one BRPOP each: a Lua script pops up to that many from its queues' lists, most urgent
  first, and records each in kombu's unacked index, as kombu's QoS.append does, in the same atomic
  step (so none is lost between popping and recording). They are then delivered as kombu delivers
  the BRPOP's message, and their QoS.append only notes them in memory.
- in a worker's event loop, acknowledgements are written together: kombu removes each acked
  message from the unacked index in a round trip of its own, on the loop's thread, which also
  delivers. Here an ack frees its prefetch slot at once and queues its tag; before the loop
  polls again (its tick) one pipeline removes every tag queued meanwhile, and the channel's
  close writes what is left. An ack that never reaches Redis (the process killed in between)
  only leaves a finished message to be redelivered after the visibility timeout, which genq's
  guarded claim then skips, as it skips any duplicate.

- a channel's plain commands (taking, acking, kombu's own unacked bookkeeping, publishing) share
  one client on its connection pool; kombu builds a new client object for each, whose setup (a
  copy of redis-py's table of reply parsers) cost 8% of a busy worker's GIL time.

genq declares no queue expiry, so unlike kombu's `_put` this one sets none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger("genq.broker")
FRONT_HEADER = "genq_front"
EPOCH_KEY = "genq:epoch"  # a Unix time, as text


MAX_TAKE = 100  # messages one round trip takes when the prefetch is unlimited

# KEYS: the unacked index (zset), the unacked hash, then the lists, most urgent first.
# ARGV: how many to take, the time to index them at. Returns [list, message, list, message, ...].
TAKE_SCRIPT = """
local n, out = tonumber(ARGV[1]), {}
for i = 3, #KEYS do
  while #out < 2 * n do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local props = cjson.decode(item)['properties']
    local info = props['delivery_info']
    redis.call('ZADD', KEYS[1], ARGV[2], props['delivery_tag'])
    redis.call('HSET', KEYS[2], props['delivery_tag'],
               '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
  end
end
return out
"""


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()  # delivery tags TAKE_SCRIPT already put in the unacked index
        self.defer_acks = False  # set once the channel's connection runs in an event loop
        self._acks: list[str] = []  # acked tags still in Redis's unacked index
        self._acks_lock = threading.Lock()  # an ack may come from a pool thread

    def ack(self, delivery_tag: str) -> None:
        if not self.defer_acks:
            return super().ack(delivery_tag)
        with self._acks_lock:
            self._acks.append(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        """Remove the acked tags queued so far from the unacked index, in one round trip."""
        with self._acks_lock:
            tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception:  # as kombu's ack_log_error: the messages come back after the visibility timeout
            log.warning("could not acknowledge %d message(s)", len(tags), exc_info=True)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.flush_acks()  # at close: what was acked must not come back
        return super().restore_unacked_once(stderr)

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _plain_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is None:
            pool = self.pool  # kombu makes a new one after a connection error
            if self._plain_client is None or self._plain_client.connection_pool is not pool:
                self._plain_client = self._create_client()
            client = self._plain_client
        yield client

    def _brpop_read(self, **options: Any) -> bool:
        delivered: bool = super()._brpop_read(**options)
        self._take_more()
        return delivered

    def _take_more(self) -> None:
        """Deliver as many more waiting messages as the prefetch allows, in one round trip."""
        if not self.ack_emulation or self.global_keyprefix or not isinstance(self.qos, QoS):
            return
        room = self.qos.can_consume_max_estimate()
        room = MAX_TAKE if room is None else min(room, MAX_TAKE)
        queues = list(self.active_queues)
        if room <= 0 or not queues:
            return
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        with self.conn_or_acquire() as client:
            taken = client.eval(TAKE_SCRIPT, 2 + len(lists), self.unacked_index_key, self.unacked_key,
                                *lists, room, time.time())
        for i in range(0, len(taken), 2):
            message = loads(bytes_to_str(taken[i + 1]))
            self.qos.recorded.add(message["properties"]["delivery_tag"])
            self.connection._deliver(message, bytes_to_str(taken[i]).rsplit(self.sep, 1)[0])
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

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)

        def flush_acks() -> None:
            for channel in self.channels:
                if isinstance(channel.qos, QoS):
                    channel.qos.defer_acks = True
                    channel.qos.flush_acks()

        loop.on_tick.add(flush_acks)


TRANSPORT = f"{__name__}:Transport"


def read_epoch(client: Any) -> float:
    """When the broker's present data began, starting it now if the broker has none (it is new,
    or lost its data and nothing was published since)."""
    with client.pipeline() as pipe:  # one round trip
        _, value = pipe.setnx(EPOCH_KEY, repr(time.time())).get(EPOCH_KEY).execute()
    return float(value)
