"""Live frames to every connection of some users, through their gateways' channels."""
from __future__ import annotations

import json
from typing import Iterable

from app.chat.presence import DELIVERY_CHANNEL, LiveConnection, Presence
from app.storage import Storage
from app.wire import close_envelope, frame_envelope


def by_gateway(conns: Iterable[LiveConnection], skip_conn: str | None = None) -> dict[str, list[str]]:
    """{gateway id: its connection ids} of these connections (but `skip_conn`)."""
    targets: dict[str, list[str]] = {}
    for conn in conns:
        if conn.conn_id != skip_conn:
            targets.setdefault(conn.gateway_id, []).append(conn.conn_id)
    return targets


def deliver_frames(client, deliveries: list[tuple[dict, dict[str, list[str]]]]) -> None:
    """Many (frame, {gateway: connections}) in one round trip; each gateway gets them in this order."""
    pipe = client.pipeline(transaction=False)
    for frame, targets in deliveries:
        if targets:
            body = json.dumps(frame, ensure_ascii=False)
            for gateway_id, conn_ids in targets.items():
                pipe.publish(DELIVERY_CHANNEL.format(gateway_id), frame_envelope(conn_ids, body))
    if len(pipe):
        pipe.execute()


def deliver_to_users(storage: Storage, frame: dict, user_ids: Iterable[int],
                     skip_conn: str | None = None) -> dict[int, list[LiveConnection]]:
    """Send `frame` to every live connection of these users (but `skip_conn`).

    Returns each user's live connections, so callers can tell who was offline.
    """
    live = Presence(storage.redis, storage.settings.presence_ttl_seconds).live_connections(user_ids)
    deliver_frames(storage.redis, [(frame, by_gateway((c for conns in live.values() for c in conns), skip_conn))])
    return live


def close_connections(storage: Storage, user_id: int, code: int, reason: str,
                      sessions: list[str] | None = None) -> int:
    """Ask the gateways holding this user's sockets to close them (after what is queued), or with
    `sessions` only those opened by these login sessions; returns how many sockets were named."""
    live = Presence(storage.redis, storage.settings.presence_ttl_seconds).live_connections([user_id])[user_id]
    for gateway_id, conn_ids in by_gateway(live).items():
        storage.redis.publish(DELIVERY_CHANNEL.format(gateway_id), close_envelope(conn_ids, code, reason, sessions))
    return len(live)
