"""The group-message path: persist once, then fan out to the members in chunks.

persist: one short transaction stores the message with the group's next
sequence number (under the group row lock); the recipients follow from the
visibility rule (app.chat.groups) and are split into chunks.

fan-out, per chunk of at most GROUP_FANOUT_CHUNK members (one task each, so a
2,000-member group never makes one giant task or holds a worker for long):
one transaction adds the message to each member's sync stream and moves their
conversation row; then live delivery to every connection of those members
(the sending connection excepted), unread counts, offline index rows. The
caller schedules pushes for the offline members. Every step is idempotent:
a redelivered chunk writes nothing twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.chat.conversations import invalidate_conversation_lists
from app.chat.delivery import deliver_to_users
from app.chat.groups import next_group_seq, recipients_of
from app.chat.conversations import message_preview
from app.chat.persist import reference_columns, stored_copy, upsert_conversations
from app.wire import message_frame
from app.chat.recall import RECALLED_PREVIEW
from app.chat.search import IndexedMessage, index_messages
from app.media.uploads import link_media
from app.storage import Storage, insert_ignoring_duplicates
from app.chat.sync import append_entries, entries_of
from app.chat.unread import count_unread
from models import (
    ENTRY_MESSAGE, ENTRY_RECALL, STATUS_RECALLED, Conversation, Message, OfflineMessageIndex, User,
)

log = logging.getLogger(__name__)

FANOUT_ATTEMPTS = 3  # a concurrent copy of the same chunk makes the first try collide


@dataclass(frozen=True)
class GroupPersistOutcome:
    msg_id: int
    stored: bool  # False: a redelivered or second copy; nothing new was written
    chunks: list[list[int]]  # recipients, in fan-out chunks (empty: nothing to dispatch)


def persist_group_message(storage: Storage, payload: dict) -> GroupPersistOutcome:
    """Store the message under the group's next sequence number; name its recipients.

    Idempotent like the private path: a redelivered payload finds its row and
    returns the same recipients (computed from the stored sequence number).
    """
    msg_id, group_id = int(payload["msg_id"]), int(payload["group_id"])
    sender = int(payload["sender_id"])
    chunk = storage.settings.group_fanout_chunk
    try:
        with storage.session() as session:
            group_seq = next_group_seq(session, storage.is_mysql, group_id)
            session.add(Message(
                id=msg_id, conversation_id=payload["conversation_id"], sender_id=sender, receiver_id=None,
                group_id=group_id, client_msg_id=payload["client_msg_id"], message_type=payload["message_type"],
                content=payload["content"], extra=payload.get("extra") or None, is_group=True,
                timestamp=int(payload["timestamp"]), group_seq=group_seq, **reference_columns(payload),
            ))
            session.flush()
            index_messages(session, [IndexedMessage(msg_id, payload["content"], sender, None, group_id)])
            link_media(session, [(msg_id, payload["message_type"], payload.get("extra"))])
            recipients = recipients_of(session, group_id, group_seq)
        storage.fence_writes([sender])  # the sender reads their own message, replica or not
        return GroupPersistOutcome(msg_id, True, _chunks(recipients, chunk))
    except IntegrityError:
        existing, original = stored_copy(storage, msg_id, sender, payload["client_msg_id"])
        if existing is not None:  # the same recipients again: they follow from the stored sequence number
            with storage.sessions() as session:
                return GroupPersistOutcome(msg_id, False,
                                           _chunks(recipients_of(session, group_id, existing.group_seq), chunk))
        if original is not None:
            return GroupPersistOutcome(original, False, [])
        raise


def _chunks(user_ids: list[int], size: int) -> list[list[int]]:
    return [user_ids[i:i + size] for i in range(0, len(user_ids), size)]


@dataclass
class FanoutOutcome:
    msg_id: int
    live_connections: int = 0
    offline_users: list[int] = field(default_factory=list)
    live_users: list[int] = field(default_factory=list)  # members handed the message live (to confirm)
    conversation_id: str = ""


def fan_out_group_message(storage: Storage, msg_id: int, user_ids: list[int],
                          origin_conn: str | None) -> FanoutOutcome:
    """Streams, conversation rows, live frames, unread and offline index for one chunk of members."""
    with storage.sessions() as session:
        msg = session.get(Message, msg_id)
        if msg is None:
            raise LookupError(f"msg {msg_id} is not persisted")
        sender_name = session.scalar(select(User.username).where(User.id == msg.sender_id)) or "someone"
    user_ids = sorted(set(user_ids))
    preview = f"{sender_name}: {message_preview(msg.message_type, msg.content)}"
    for attempt in range(FANOUT_ATTEMPTS):
        try:
            seqs, read_upto, recalled = _write_streams(storage, msg, user_ids, preview)
            break
        except IntegrityError:  # another copy of this chunk committed first: take its entries
            if attempt == FANOUT_ATTEMPTS - 1:
                raise
    outcome = FanoutOutcome(msg_id, conversation_id=msg.conversation_id)
    if recalled:  # recalled before this chunk ran: streamed as recalled, nothing to show or count
        invalidate_conversation_lists(storage, seqs.keys())
        return outcome
    # Cached lists go before the live frame: a client that refreshes its list when
    # the frame arrives must not be served the list from before this message.
    invalidate_conversation_lists(storage, seqs.keys())
    live = deliver_to_users(storage, message_frame(msg), seqs.keys(), skip_conn=origin_conn)
    outcome.live_connections = sum(1 for conns in live.values() for c in conns if c.conn_id != origin_conn)
    outcome.offline_users = [uid for uid in seqs if uid != msg.sender_id and not live.get(uid)]
    outcome.live_users = [uid for uid in seqs if uid != msg.sender_id and live.get(uid)]
    _index_offline(storage, msg, outcome.offline_users)
    # Counted last (a visible sign the chunk ran); not for the sender, nor for a
    # member who already read past this message (a read that committed first).
    count_unread(storage, [(msg_id, msg.conversation_id,
                            [(uid, seq) for uid, seq in seqs.items()
                             if uid != msg.sender_id and (read_upto.get(uid) or 0) < msg_id])])
    return outcome


def _write_streams(storage: Storage, msg: Message, user_ids: list[int], preview: str):
    """One transaction: conversation rows moved to this message, a stream entry per member
    (and, for a message recalled meanwhile, its recall entry right after)."""
    with storage.session() as session:
        # A shared lock on the message: a recall either sees these entries or is seen here.
        status, content, edited_at = session.execute(select(Message.status, Message.content, Message.edited_at)
                                                     .where(Message.id == msg.id).with_for_update(read=True)).one()
        recalled = status == STATUS_RECALLED
        if recalled:
            preview = RECALLED_PREVIEW
        elif edited_at != msg.edited_at:  # edited since it was loaded: lists and live frames show the new text
            preview = preview.removesuffix(message_preview(msg.message_type, msg.content)) \
                + message_preview(msg.message_type, content)
            msg.content, msg.edited_at = content, edited_at
        have = entries_of(session, msg.id, ENTRY_MESSAGE, user_ids)
        missing = [uid for uid in user_ids if uid not in have]
        # Conversation rows first, then user rows: the private path's lock order.
        _upsert_group_conversations(session, storage.is_mysql, msg, missing, preview)
        seqs = {**have, **append_entries(session, storage.is_mysql, [(missing, msg.id, msg.conversation_id)])[0]}
        if recalled:
            append_entries(session, storage.is_mysql, [(missing, msg.id, msg.conversation_id)], kind=ENTRY_RECALL)
        read_upto = {uid: pos for uid, pos in session.execute(
            select(Conversation.user_id, Conversation.last_read_msg_id).where(
                Conversation.conversation_id == msg.conversation_id, Conversation.user_id.in_(user_ids))).all()}
    storage.fence_writes([msg.sender_id] if msg.sender_id in seqs else [])  # the sender's own stream entry
    return seqs, read_upto, recalled


def _upsert_group_conversations(session, is_mysql: bool, msg: Message, user_ids: list[int], preview: str) -> None:
    upsert_conversations(session, is_mysql, [
        {"conversation_id": msg.conversation_id, "user_id": uid, "target_id": msg.group_id, "is_group": True,
         "last_message": preview, "last_message_time": msg.timestamp, "last_msg_id": msg.id} for uid in user_ids])


def _index_offline(storage: Storage, msg: Message, user_ids: list[int]) -> None:
    if not user_ids:
        return
    with storage.session() as session:  # redelivery: existing rows are kept
        session.execute(insert_ignoring_duplicates(OfflineMessageIndex, storage.is_mysql), [
            {"user_id": uid, "message_id": msg.id, "conversation_id": msg.conversation_id} for uid in user_ids])
