"""Snowflake message ids: 41 bits of milliseconds, 10 bits of node, 12 of sequence.

Every gateway process leases its own node number in Redis, so ids are unique
across any number of gateways without coordination per id.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from typing import Callable

import redis

log = logging.getLogger(__name__)

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS, SEQUENCE_BITS = 10, 12
MAX_NODE = (1 << NODE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
LEASE_KEY = "snowflake:node:{}"

_RENEW_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
if not owner then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
return 0
"""


class SnowflakeIds:
    def __init__(self, node_id: int, clock: Callable[[], float] = time.time):
        self._check_node(node_id)
        self.node_id = node_id
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    @staticmethod
    def _check_node(node_id: int) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"snowflake node must be 0..{MAX_NODE}, got {node_id}")

    def set_node(self, node_id: int) -> None:
        self._check_node(node_id)
        with self._lock:
            self.node_id = node_id

    def next_id(self) -> int:
        with self._lock:
            now = int(self._clock() * 1000)
            if now < self._last_ms:  # clock stepped back: keep the old time, never reuse an id
                now = self._last_ms
            if now == self._last_ms:
                self._sequence = (self._sequence + 1) & MAX_SEQUENCE
                if self._sequence == 0:  # 4096 ids in this ms: borrow the next one
                    now = self._last_ms + 1
            else:
                self._sequence = 0
            self._last_ms = now
            return ((now - EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS)) | (self.node_id << SEQUENCE_BITS) | self._sequence


def timestamp_of(msg_id: int) -> int:
    """Milliseconds since the epoch at which an id was made."""
    return (msg_id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS


class NodeLease:
    """A node number held in Redis with a TTL, renewed while the process lives.

    If Redis forgets the lease (flush, restart) the renewal takes it back; if
    another process took it meanwhile, we move to a fresh node.
    """

    def __init__(self, client: redis.Redis, ttl_seconds: int = 60):
        self.redis = client
        self.ttl = ttl_seconds
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.node_id: int | None = None
        self._renew = self.redis.register_script(_RENEW_SCRIPT)

    def acquire(self) -> int:
        # Random start: after a Redis flush two fresh claimants rarely pick the same node.
        start = random.randrange(MAX_NODE + 1)
        for i in range(MAX_NODE + 1):
            node = (start + i) % (MAX_NODE + 1)
            if self.redis.set(LEASE_KEY.format(node), self.owner, nx=True, ex=self.ttl):
                self.node_id = node
                log.info("snowflake node %d leased by %s", node, self.owner)
                return node
        raise RuntimeError("all 1024 snowflake nodes are leased: too many gateway processes")

    def renew(self) -> int:
        """Keep the lease; returns the node to use from now on."""
        if self.node_id is None or not self._renew(keys=[LEASE_KEY.format(self.node_id)], args=[self.owner, self.ttl]):
            if self.node_id is not None:
                log.warning("snowflake node %d was taken by another process; leasing a new one", self.node_id)
            return self.acquire()
        return self.node_id

    def release(self) -> None:
        if self.node_id is not None:
            key = LEASE_KEY.format(self.node_id)
            if self.redis.get(key) == self.owner:
                self.redis.delete(key)


class LeasedIds:
    """Snowflake ids from a leased node that refuse to be made on a stale lease.

    A gateway that stalled past its lease (GC pause, network cut) could find
    its node taken by another gateway: it must renew before making another id.
    """

    def __init__(self, lease: NodeLease, margin_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.lease = lease
        self._margin = margin_seconds
        self._clock = clock
        self.ids = SnowflakeIds(lease.acquire())
        self._valid_until = clock() + lease.ttl - margin_seconds

    @property
    def node_id(self) -> int:
        return self.ids.node_id

    def renew(self) -> None:
        started = self._clock()
        self.ids.set_node(self.lease.renew())
        self._valid_until = started + self.lease.ttl - self._margin

    def next_id(self) -> int:
        if self._clock() > self._valid_until:
            self.renew()  # raises if Redis is unreachable: no id without a valid lease
        return self.ids.next_id()
