"""Who is online, on which gateway: the Redis side of routing.

`online:user:{uid}` is a hash with one field per connection (conn_id ->
JSON {gateway_id, connected_at, last_heartbeat}), TTL refreshed by heartbeats.
A gateway also keeps `gateway:alive:{gid}` fresh; connections on a gateway
whose key has expired count as offline at once, without waiting for the
5-minute presence TTL.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterable

import redis

PRESENCE_KEY = "online:user:{}"
LAST_SEEN_KEY = "last_seen:{}"
GATEWAY_ALIVE_KEY = "gateway:alive:{}"
DELIVERY_CHANNEL = "gateway:{}:deliver"
GATEWAY_ALIVE_TTL = 15


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class LiveConnection:
    user_id: int
    conn_id: str
    gateway_id: str


class Presence:
    def __init__(self, client: redis.Redis, ttl_seconds: int = 300):
        self.redis = client
        self.ttl = ttl_seconds

    def connect(self, user_id: int, conn_id: str, gateway_id: str, connected_at: int) -> None:
        self.refresh([(user_id, conn_id, gateway_id, connected_at)])

    def refresh(self, conns: Iterable[tuple[int, str, str, int]], chunk: int = 500) -> None:
        """Write (or re-write after a Redis flush) the entries of live connections.

        In pipelines of `chunk` connections with a yield between them, so that a
        gateway with 20,000 sockets does not hold its event loop for the whole rewrite.
        """
        beat = now_ms()
        conns = list(conns)
        # The gateways first: dispatch prunes an entry whose gateway it does not know alive, so entries
        # written before their gateway's flag (after a flush) would be deleted as fast as they are written.
        for gateway_id in sorted({c[2] for c in conns}):
            self.mark_gateway_alive(gateway_id)
        for start in range(0, len(conns), chunk):
            if start:
                time.sleep(0)  # under gevent: let the sockets' greenlets run
            pipe = self.redis.pipeline(transaction=False)
            for user_id, conn_id, gateway_id, connected_at in conns[start:start + chunk]:
                key = PRESENCE_KEY.format(user_id)
                entry = {"gateway_id": gateway_id, "connected_at": connected_at, "last_heartbeat": beat}
                pipe.hset(key, conn_id, json.dumps(entry))
                pipe.expire(key, self.ttl)
            pipe.execute()

    def disconnect(self, user_id: int, conn_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(PRESENCE_KEY.format(user_id), conn_id)
        pipe.set(LAST_SEEN_KEY.format(user_id), now_ms())
        pipe.execute()

    def mark_gateway_alive(self, gateway_id: str) -> bool:
        """Refresh the gateway's liveness; False if Redis had forgotten it (expired or flushed)."""
        previous = self.redis.set(GATEWAY_ALIVE_KEY.format(gateway_id), now_ms(), ex=GATEWAY_ALIVE_TTL, get=True)
        return previous is not None

    def mark_gateway_gone(self, gateway_id: str) -> None:
        self.redis.delete(GATEWAY_ALIVE_KEY.format(gateway_id))

    def live_connections(self, user_ids: Iterable[int]) -> dict[int, list[LiveConnection]]:
        """Every connection of these users on a gateway that is alive; prunes dead entries."""
        user_ids = list(dict.fromkeys(user_ids))
        pipe = self.redis.pipeline(transaction=False)
        for uid in user_ids:
            pipe.hgetall(PRESENCE_KEY.format(uid))
        raw_entries = pipe.execute()
        stale_before = now_ms() - self.ttl * 1000
        candidates: dict[int, list[tuple[str, str]]] = {}
        stale: list[tuple[int, str]] = []
        for uid, fields in zip(user_ids, raw_entries):
            for conn_id, raw in fields.items():
                try:
                    entry = json.loads(raw)
                    gateway_id, beat = entry["gateway_id"], int(entry["last_heartbeat"])
                except (ValueError, KeyError, TypeError):
                    stale.append((uid, conn_id))
                    continue
                if beat < stale_before:
                    stale.append((uid, conn_id))
                else:
                    candidates.setdefault(uid, []).append((conn_id, gateway_id))
        gateways = sorted({gw for conns in candidates.values() for _, gw in conns})
        alive = set()
        if gateways:
            flags = self.redis.mget([GATEWAY_ALIVE_KEY.format(gw) for gw in gateways])
            alive = {gw for gw, flag in zip(gateways, flags) if flag is not None}
        result: dict[int, list[LiveConnection]] = {uid: [] for uid in user_ids}
        for uid, conns in candidates.items():
            for conn_id, gateway_id in conns:
                if gateway_id in alive:
                    result[uid].append(LiveConnection(uid, conn_id, gateway_id))
                else:
                    stale.append((uid, conn_id))
        if stale:
            pipe = self.redis.pipeline(transaction=False)
            for uid, conn_id in stale:
                pipe.hdel(PRESENCE_KEY.format(uid), conn_id)
            pipe.execute()
        return result

    def presence_of(self, user_id: int) -> dict:
        online = bool(self.live_connections([user_id])[user_id])
        last_seen = self.redis.get(LAST_SEEN_KEY.format(user_id))
        return {"online": online, "last_seen": now_ms() if online else (int(last_seen) if last_seen else None)}


def sweep_presence(client: redis.Redis, ttl_seconds: int, batch: int = 500) -> int:
    """Prune entries of dead gateways and silent connections; returns users scanned."""
    presence = Presence(client, ttl_seconds)
    scanned, pending = 0, []
    for key in client.scan_iter(match=PRESENCE_KEY.format("*"), count=batch):
        try:
            pending.append(int(key.rsplit(":", 1)[1]))
        except ValueError:
            continue
        if len(pending) >= batch:
            presence.live_connections(pending)
            scanned, pending = scanned + len(pending), []
    if pending:
        presence.live_connections(pending)
        scanned += len(pending)
    return scanned
