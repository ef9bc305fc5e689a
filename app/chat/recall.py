"""`recall`: the sender takes a message back within two minutes (a group's owner at any time);
an admin removes any message's content (`DELETE /api/admin/messages/{msg_id}`) the same way."""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update

from app.chat.conversations import invalidate_conversation_lists
from app.errors import Forbidden, NotFound, RecallExpired
from app.ids import timestamp_of
from app.storage import Storage
from app.chat.search import unindex_message
from app.media.uploads import unlink_media
from app.chat.sync import append_missing, append_missing_later, entries_of
from app.chat.versions import forget_versions
from app.chat.unread import forget_unread, rebuild_unread
from models import ENTRY_MESSAGE, ENTRY_RECALL, STATUS_RECALLED, ChatGroup, Conversation, Message

RECALL_WINDOW_MS = 2 * 60 * 1000
RECALLED_PREVIEW = "[message recalled]"
IN_FLIGHT_WAIT_SECONDS = 5.0
BY_SENDER, BY_OWNER, BY_ADMIN = "sender", "owner", "admin"  # the `by` of a `recalled` frame


@dataclass(frozen=True)
class RecallOutcome:
    msg_id: int
    conversation_id: str
    parties: list[int]
    recalled_at: int
    by: str = BY_SENDER
    sender_id: int = 0


def recall_message(storage: Storage, user_id: int, msg_id: int, now_ms: int | None = None,
                   as_admin: bool = False) -> RecallOutcome:
    """Clear the message's content, mark it recalled, and put a recall entry in
    the sync stream of everyone who received it. Recalling it again changes
    nothing in MySQL but completes what an interrupted attempt left undone.

    Private: the sender, within 2 minutes. Group: the sender within 2 minutes,
    or the group owner at any time. `as_admin` (the caller checked the admin
    role): any message, at any time.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    await_persisted(storage, msg_id, now_ms)
    with storage.session() as session:
        msg = session.scalar(select(Message).where(Message.id == msg_id).with_for_update())
        parties = parties_of(session, msg) if msg is not None else []
        # The sender may recall before the fan-out reached their own stream.
        if msg is None or (not as_admin and user_id not in parties and user_id != msg.sender_id):
            raise NotFound(f"message {msg_id} does not exist")
        by_owner = not as_admin and msg.is_group and user_id in parties and session.scalar(
            select(ChatGroup.owner_id).where(ChatGroup.id == msg.group_id)) == user_id
        if not as_admin and msg.sender_id != user_id and not by_owner:
            raise Forbidden("only the sender can recall a message" + (" (or the group owner)" if msg.is_group else ""))
        by = BY_ADMIN if as_admin else BY_SENDER if msg.sender_id == user_id else BY_OWNER
        already = msg.status == STATUS_RECALLED
        if not already and not as_admin and not by_owner and now_ms - msg.timestamp > RECALL_WINDOW_MS:
            raise RecallExpired("messages can be recalled for 2 minutes after sending")
        if already:  # a retry: redo what an earlier attempt may not have finished
            now_ms, by = msg.recalled_at, msg.recalled_by or by
        else:
            _mark_recalled(session, msg, now_ms, by)
        rest = append_missing(session, storage, parties, msg.id, msg.conversation_id, ENTRY_RECALL)
    append_missing_later(storage, rest, msg.id, msg.conversation_id, ENTRY_RECALL)  # a big group
    if msg.is_group:
        forget_unread(storage, parties)  # recounted from MySQL when next asked for
    else:
        rebuild_unread(storage, [msg.receiver_id])  # a recalled message no longer counts as unread
    storage.fence_writes([user_id, *([msg.sender_id] if as_admin else [])])  # the recaller sees their recall at once
    invalidate_conversation_lists(storage, parties)
    return RecallOutcome(msg.id, msg.conversation_id, parties, now_ms, by, msg.sender_id)


def parties_of(session, msg: Message) -> list[int]:
    """Who has the message: both sides of a private chat; the members it was delivered to in a group."""
    if not msg.is_group:
        return [msg.sender_id, msg.receiver_id]
    return sorted(entries_of(session, msg.id, ENTRY_MESSAGE))


def _mark_recalled(session, msg: Message, now_ms: int, by: str) -> None:
    msg.status, msg.content, msg.extra, msg.recalled_at, msg.recalled_by = STATUS_RECALLED, "", None, now_ms, by
    unindex_message(session, msg.id)  # recalled content is never found
    forget_versions(session, msg.id)  # nor read back from its earlier versions
    unlink_media(session, msg.id)  # nor its image or file served to the other parties
    session.execute(update(Conversation).where(  # the conversation_id index: every member's row
        Conversation.conversation_id == msg.conversation_id, Conversation.last_msg_id == msg.id)
        .values(last_message=RECALLED_PREVIEW))


def await_persisted(storage: Storage, msg_id: int, now_ms: int) -> None:
    """An acked message may still be queued for persist: give a recent id a moment."""
    if now_ms - timestamp_of(msg_id) > RECALL_WINDOW_MS:
        return  # too old to be in flight (or not an id of ours): answer at once
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while time.monotonic() < deadline:
        with storage.sessions() as session:
            if session.get(Message, msg_id) is not None:
                return
        time.sleep(0.05)

