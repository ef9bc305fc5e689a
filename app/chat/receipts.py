"""Receipts: `read` (a user read a conversation up to a message) and `received` (a device holds it).

Private chats mark the receiver's messages read (status 1); in groups each
member has a read position (conversation.last_read_msg_id) and the message
rows stay as they are. Both chats keep a delivered position
(conversation.last_delivered_msg_id: the furthest any of the user's devices
confirmed; a read counts as delivered too).

When a position moves forward, the peer who is told (the other party of a
private chat, the author of the message in a group) gets a `receipt` entry in
their sync stream in the same transaction, pointing at a Receipt row: a
sender who was offline finds it when they sync. A position that does not
move writes nothing, so a client repeating `read` or `received` cannot fill
anyone's stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import and_, insert, select, update

from app.chat.conversations import invalidate_conversation_lists, require_member
from app.chat.sync import append_entries
from app.chat.unread import rebuild_unread
from app.errors import Forbidden, NotFound
from app.storage import Storage
from models import (
    ENTRY_RECEIPT, RECEIPT_DELIVERED, RECEIPT_READ, STATUS_READ, STATUS_UNREAD, Conversation, GroupMember,
    Message, Receipt,
)


@dataclass(frozen=True)
class ReadOutcome:
    conversation_id: str
    msg_id: int
    reader: int
    peer: int | None  # who gets a receipt: the other party of a private chat, the author in a group
    unread_left: int
    timestamp: int  # ms: when the read was applied


@dataclass(frozen=True)
class ReceivedOutcome:
    conversation_id: str
    msg_id: int
    reader: int
    peer: int | None  # None: nobody is told (the position did not move, or no one to tell)
    timestamp: int


def mark_read(storage: Storage, user_id: int, conversation_id: str, msg_id: int,
              now_ms: int | None = None) -> ReadOutcome:
    """Mark the user's messages of the conversation up to msg_id read; recount unread."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    with storage.session() as session:
        conv = require_member(session, user_id, conversation_id)
        session.execute(update(Message).where(
            Message.conversation_id == conversation_id, Message.receiver_id == user_id,
            Message.status == STATUS_UNREAD, Message.id <= msg_id).values(status=STATUS_READ))
        # The read position only moves forward (reads from two devices may cross).
        moved = session.execute(update(Conversation).where(
            Conversation.id == conv.id,
            Conversation.last_read_msg_id.is_(None) | (Conversation.last_read_msg_id < msg_id))
            .values(last_read_msg_id=msg_id)).rowcount > 0
        _advance_delivered(session, conv.id, msg_id)  # what was read was delivered
        peer = _peer_of(session, user_id, conv, msg_id)
        if moved and peer is not None:
            _record(session, storage, peer, conversation_id, user_id, msg_id, RECEIPT_READ, now_ms)
    storage.fence_writes([user_id])
    counts = rebuild_unread(storage, [user_id])[user_id]
    # The peer's list shows this position (peer_read_msg_id): only when it moved.
    invalidate_conversation_lists(storage, [user_id] + ([peer] if moved and peer is not None and not conv.is_group
                                                        else []))
    return ReadOutcome(conversation_id, msg_id, user_id, peer, counts.get(conversation_id, 0), now_ms)


def mark_received(storage: Storage, user_id: int, conversation_id: str, msg_id: int,
                  now_ms: int | None = None) -> ReceivedOutcome:
    """A device of the user holds every message of the conversation up to msg_id."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    with storage.session() as session:
        conv = require_member(session, user_id, conversation_id)
        moved = _advance_delivered(session, conv.id, msg_id)
        peer = _peer_of(session, user_id, conv, msg_id) if moved else None
        if peer is not None:
            _record(session, storage, peer, conversation_id, user_id, msg_id, RECEIPT_DELIVERED, now_ms)
    if peer is not None and not conv.is_group:
        invalidate_conversation_lists(storage, [peer])  # its peer_delivered_msg_id moved
    return ReceivedOutcome(conversation_id, msg_id, user_id, peer, now_ms)


def _advance_delivered(session, conversation_row_id: int, msg_id: int) -> bool:
    return session.execute(update(Conversation).where(
        Conversation.id == conversation_row_id,
        Conversation.last_delivered_msg_id.is_(None) | (Conversation.last_delivered_msg_id < msg_id))
        .values(last_delivered_msg_id=msg_id)).rowcount > 0


def _peer_of(session, user_id: int, conv: Conversation, msg_id: int) -> int | None:
    if not conv.is_group:
        return conv.target_id
    return _group_receipt_to(session, user_id, conv.target_id, conv.conversation_id, msg_id)


def _record(session, storage: Storage, peer: int, conversation_id: str, reader: int, msg_id: int, kind: int,
            now_ms: int) -> None:
    """The Receipt row and its entry in the peer's stream, in the caller's transaction."""
    receipt_id = session.execute(insert(Receipt).values(
        conversation_id=conversation_id, reader_id=reader, msg_id=msg_id, kind=kind,
        created_at_ms=now_ms)).inserted_primary_key[0]
    append_entries(session, storage.is_mysql, [([peer], receipt_id, conversation_id)], kind=ENTRY_RECEIPT)


def _group_receipt_to(session, user_id: int, group_id: int, conversation_id: str, msg_id: int) -> int | None:
    """The author of msg_id, if the reader is still a member and could see that message."""
    row = session.execute(select(Message.sender_id, Message.group_seq).where(
        Message.id == msg_id, Message.conversation_id == conversation_id)).first()
    member = session.scalar(select(GroupMember.joined_seq).where(
        GroupMember.group_id == group_id, GroupMember.user_id == user_id, GroupMember.left_seq.is_(None)))
    if row is None or member is None or row.group_seq <= member or row.sender_id == user_id:
        return None
    return row.sender_id


def receipts_of(session, receipt_ids) -> dict[int, Receipt]:
    """The Receipt rows behind `receipt` stream entries."""
    ids = list(set(receipt_ids))
    return {r.id: r for r in session.scalars(select(Receipt).where(Receipt.id.in_(ids)))} if ids else {}


def message_receipts(storage: Storage, user_id: int, conversation_id: str, msg_id: int) -> dict:
    """Who read and who received one of the user's own messages: the other party of a private chat,
    or the group's members who may see it (current members who joined before it was stored)."""
    with storage.read_session_for(user_id) as session:
        conv = require_member(session, user_id, conversation_id)
        msg = session.execute(select(Message.sender_id, Message.group_seq).where(
            Message.id == msg_id, Message.conversation_id == conversation_id)).first()
        if msg is None:
            raise NotFound(f"message {msg_id} is not in conversation {conversation_id!r}")
        if msg.sender_id != user_id:
            raise Forbidden("only the sender of a message can see its receipts")
        positions = select(Conversation.user_id, Conversation.last_read_msg_id, Conversation.last_delivered_msg_id)
        if conv.is_group:
            rows = session.execute(positions.join(GroupMember, and_(
                GroupMember.group_id == conv.target_id, GroupMember.user_id == Conversation.user_id,
                GroupMember.left_seq.is_(None), GroupMember.joined_seq < msg.group_seq,
                GroupMember.user_id != user_id))
                .where(Conversation.conversation_id == conversation_id)).all()
        else:
            rows = session.execute(positions.where(Conversation.conversation_id == conversation_id,
                                                   Conversation.user_id == conv.target_id)).all()
    read = sorted(r.user_id for r in rows if (r.last_read_msg_id or 0) >= msg_id)
    received = sorted(r.user_id for r in rows
                      if max(r.last_delivered_msg_id or 0, r.last_read_msg_id or 0) >= msg_id)
    return {"msg_id": str(msg_id), "conversation_id": conversation_id, "recipients": len(rows),
            "read_count": len(read), "delivered_count": len(received),
            "read_by": [str(u) for u in read], "delivered_to": [str(u) for u in received]}
