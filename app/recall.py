"""`recall`: the sender takes a message back within two minutes."""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update

from app.conversations import invalidate_conversation_lists
from app.errors import Forbidden, NotFound, RecallExpired
from app.snowflake import timestamp_of
from app.storage import Storage
from app.sync import append_entries
from app.unread import rebuild_unread
from models import ENTRY_RECALL, STATUS_RECALLED, Conversation, Message

RECALL_WINDOW_MS = 2 * 60 * 1000
RECALLED_PREVIEW = "[message recalled]"
IN_FLIGHT_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class RecallOutcome:
    msg_id: int
    conversation_id: str
    parties: list[int]
    recalled_at: int


def recall_message(storage: Storage, user_id: int, msg_id: int, now_ms: int | None = None) -> RecallOutcome:
    """Clear the message's content, mark it recalled, and put a recall entry in
    every party's sync stream. Recalling it again changes nothing in MySQL."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    _await_persisted(storage, msg_id, now_ms)
    with storage.session() as session:
        msg = session.scalar(select(Message).where(Message.id == msg_id).with_for_update())
        if msg is None or user_id not in (msg.sender_id, msg.receiver_id):
            raise NotFound(f"message {msg_id} does not exist")
        if msg.sender_id != user_id:
            raise Forbidden("only the sender can recall a message")
        parties = [msg.sender_id, msg.receiver_id]
        already = msg.status == STATUS_RECALLED
        if not already and now_ms - msg.timestamp > RECALL_WINDOW_MS:
            raise RecallExpired("messages can be recalled for 2 minutes after sending")
        if already:  # a retry: redo the Redis side below, which an earlier attempt may not have finished
            now_ms = msg.recalled_at
        else:
            _mark_recalled(session, storage, msg, parties, now_ms)
    rebuild_unread(storage, msg.receiver_id)  # a recalled message no longer counts as unread
    invalidate_conversation_lists(storage, parties)
    return RecallOutcome(msg.id, msg.conversation_id, parties, now_ms)


def _mark_recalled(session, storage: Storage, msg: Message, parties: list[int], now_ms: int) -> None:
    msg.status, msg.content, msg.extra, msg.recalled_at = STATUS_RECALLED, "", None, now_ms
    session.execute(update(Conversation).where(  # user_id first: the unique index, two rows locked
        Conversation.user_id.in_(parties), Conversation.conversation_id == msg.conversation_id,
        Conversation.last_msg_id == msg.id)
        .values(last_message=RECALLED_PREVIEW))
    append_entries(session, storage.is_mysql, parties, msg.id, msg.conversation_id, kind=ENTRY_RECALL)


def _await_persisted(storage: Storage, msg_id: int, now_ms: int) -> None:
    """An acked message may still be queued for persist: give a recent id a moment."""
    if now_ms - timestamp_of(msg_id) > RECALL_WINDOW_MS:
        return  # too old to be in flight (or not an id of ours): answer at once
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while time.monotonic() < deadline:
        with storage.sessions() as session:
            if session.get(Message, msg_id) is not None:
                return
        time.sleep(0.05)
