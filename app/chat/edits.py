"""`edit`: the sender replaces a message's text within MESSAGE_EDIT_WINDOW_SECONDS.

Like a recall (app.chat.recall): the message row changes under its lock, each
earlier version stays in message_edit, and every party's stream gets an
`edited` entry pointing at that edit, in the same transaction."""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from app.chat.changes import lock_for_change
from app.chat.conversations import invalidate_conversation_lists, message_preview
from app.chat.recall import await_persisted
from app.chat.search import IndexedMessage, index_messages, unindex_message
from app.chat.sync import append_missing, append_missing_later
from app.push.planning import refresh_unsent_payloads
from app.errors import EditExpired, InvalidInput
from app.storage import Storage
from models import ENTRY_EDIT, Conversation, Message, MessageEdit, User


@dataclass(frozen=True)
class EditOutcome:
    msg_id: int
    conversation_id: str
    parties: list[int]
    content: str
    edited_at: int
    edit_id: int


def edit_message(storage: Storage, user_id: int, msg_id: int, content: str, window_seconds: int,
                 now_ms: int | None = None) -> EditOutcome:
    """Replace the content, keep the replaced one, and put an `edited` entry in the stream of
    everyone who has the message. Sending the latest edit again (a client retry) adds no
    version and no entry: it only completes what an interrupted attempt left undone."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    await_persisted(storage, msg_id, now_ms)
    with storage.session() as session:
        msg, parties = lock_for_change(session, user_id, msg_id, "a recalled message cannot be edited",
                                       sender_only="only the sender can edit a message")
        latest = session.scalar(select(MessageEdit).where(MessageEdit.message_id == msg.id)
                                .order_by(MessageEdit.id.desc()).limit(1))
        if latest is not None and content == msg.content == latest.content:
            edit_id, edited_at = latest.id, latest.edited_at  # a retry of the latest edit
        else:
            if content == msg.content:
                raise InvalidInput("'content' is the message's content already")
            if now_ms - msg.timestamp > window_seconds * 1000:
                raise EditExpired(f"messages can be edited for {window_seconds} s after sending")
            edit_id, edited_at = _apply(session, msg, user_id, content, now_ms), now_ms
        rest = append_missing(session, storage, parties, msg.id, msg.conversation_id, ENTRY_EDIT, edit_id)
    append_missing_later(storage, rest, msg.id, msg.conversation_id, ENTRY_EDIT, edit_id)  # a big group
    storage.fence_writes([user_id])  # the editor reads their edit back at once
    invalidate_conversation_lists(storage, parties)
    refresh_unsent_payloads(storage, msg.id)  # a push planned but not sent yet shows the new text
    return EditOutcome(msg.id, msg.conversation_id, parties, content, edited_at, edit_id)


def _apply(session, msg: Message, user_id: int, content: str, now_ms: int) -> int:
    edit_id = session.execute(insert(MessageEdit).values(
        message_id=msg.id, editor_id=user_id, edited_at=now_ms, content=content,
        previous_content=msg.content)).inserted_primary_key[0]
    msg.content, msg.edited_at = content, now_ms
    unindex_message(session, msg.id)  # the old words are no longer found, the new ones are
    index_messages(session, [IndexedMessage(msg.id, content, msg.sender_id, msg.receiver_id, msg.group_id)])
    session.execute(update(Conversation).where(  # lists showing this message as the last one
        Conversation.conversation_id == msg.conversation_id, Conversation.last_msg_id == msg.id)
        .values(last_message=_list_preview(session, msg, content)))
    return edit_id


def _list_preview(session, msg: Message, content: str) -> str:
    preview = message_preview(msg.message_type, content)
    if not msg.is_group:
        return preview
    # A group's list shows who wrote it (app.chat.group_messages).
    name = session.scalar(select(User.username).where(User.id == msg.sender_id)) or "someone"
    return f"{name}: {preview}"


def message_versions(storage: Storage, msg_id: int) -> list[dict]:
    """Every version of a message, oldest first (for the sender and admins): the original, then each edit."""
    with storage.sessions() as session:
        edits = session.scalars(select(MessageEdit).where(MessageEdit.message_id == msg_id)
                                .order_by(MessageEdit.id)).all()
    if not edits:
        return []
    versions = [{"content": edits[0].previous_content, "edited_at": None}]
    versions += [{"content": e.content, "edited_at": e.edited_at} for e in edits]
    return versions
