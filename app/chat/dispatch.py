"""Dispatch: a stored private message to its parties' live connections, or to the offline path.

Live frames go through the recipients' gateways' delivery channels
(app.chat.delivery); an offline recipient gets an offline-index row and an
unread count, and the caller queues their push. Safe to run twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from app.chat.delivery import by_gateway, deliver_frames
from app.chat.presence import Presence
from app.chat.unread import count_unread
from app.storage import Storage, insert_ignoring_duplicates
from app.wire import message_frame
from models import ENTRY_MESSAGE, Message, OfflineMessageIndex, SyncEntry


@dataclass
class DispatchOutcome:
    msg_id: int
    live_connections: int = 0
    offline_users: list[int] = field(default_factory=list)
    live_users: list[int] = field(default_factory=list)  # recipients handed the message live (to confirm)
    conversation_id: str = ""


def dispatch_private_messages(storage: Storage, items: list[tuple[int, str | None]]) -> list[DispatchOutcome]:
    """Stored private messages (msg id, sending connection) to every connection of both
    parties (not the sending one), unread for the recipient, offline index for an offline
    recipient; returns who is offline per message (the caller queues their pushes).

    One read of the messages and their stream positions, one presence lookup, one Redis
    round trip for the live frames and one for unread, one offline-index insert."""
    ids = [msg_id for msg_id, _ in items]
    with storage.sessions() as session:
        messages = {msg.id: msg for msg in session.scalars(select(Message).where(Message.id.in_(ids)))}
        positions = {(uid, mid): seq for uid, mid, seq in session.execute(
            select(SyncEntry.user_id, SyncEntry.message_id, SyncEntry.seq).where(
                SyncEntry.message_id.in_(ids), SyncEntry.kind == ENTRY_MESSAGE))}
    missing = [mid for mid in ids if mid not in messages or (messages[mid].receiver_id, mid) not in positions]
    if missing:
        raise LookupError(f"msg {', '.join(map(str, missing))} is not persisted")
    live = Presence(storage.redis, storage.settings.presence_ttl_seconds).live_connections(
        uid for mid in ids for uid in (messages[mid].receiver_id, messages[mid].sender_id))
    deliveries, outcomes, offline = [], [], []
    for msg_id, origin_conn in items:
        msg, outcome = messages[msg_id], DispatchOutcome(msg_id, conversation_id=messages[msg_id].conversation_id)
        targets = by_gateway(live[msg.receiver_id] + live[msg.sender_id], origin_conn)
        outcome.live_connections = sum(map(len, targets.values()))
        deliveries.append((message_frame(msg), targets))
        if not live[msg.receiver_id]:
            offline.append({"user_id": msg.receiver_id, "message_id": msg_id, "conversation_id": msg.conversation_id})
            outcome.offline_users.append(msg.receiver_id)
        elif msg.receiver_id != msg.sender_id:
            outcome.live_users.append(msg.receiver_id)
        outcomes.append(outcome)
    deliver_frames(storage.redis, deliveries)
    if offline:
        with storage.session() as session:  # a redelivery finds its rows there
            session.execute(insert_ignoring_duplicates(OfflineMessageIndex, storage.is_mysql), offline)
    # Last: a visible sign that dispatch ran.
    count_unread(storage, [(mid, messages[mid].conversation_id,
                            [(messages[mid].receiver_id, positions[(messages[mid].receiver_id, mid)])])
                           for mid, _ in items])
    return outcomes

