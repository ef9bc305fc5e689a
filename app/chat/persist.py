"""Persist: accepted private messages into MySQL, idempotently.

One transaction per message or per batch: the message row(s), both parties'
conversation rows and their sync stream entries. Safe to run twice
(redelivery): a copy already stored is recognised and only dispatched again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.chat.conversations import invalidate_conversation_lists, message_preview
from app.chat.search import IndexedMessage, index_messages
from app.media.uploads import link_media
from app.chat.sync import append_entries
from app.storage import Storage
from models import Message

log = logging.getLogger(__name__)


class IdCollision(RuntimeError):
    """Two different messages carry one id (a snowflake node used twice)."""


@dataclass(frozen=True)
class PersistOutcome:
    msg_id: int
    stored: bool  # False: this copy was a duplicate and nothing new was written
    dispatch: bool  # whether the message should (still) be dispatched
    collided: bool = False  # another message holds this id: not stored, for an operator


def persist_private_message(storage: Storage, payload: dict) -> PersistOutcome:
    """Store the message and both conversation rows in one transaction.

    Idempotent: a redelivered payload finds its row and only asks for dispatch
    again; a second copy of the same (sender, client_msg_id) under another id
    (possible only after Redis lost the dedupe key) is dropped.
    """
    msg_id = int(payload["msg_id"])
    sender, to = int(payload["sender_id"]), int(payload["to"])
    try:
        _store(storage, [payload])
        return PersistOutcome(msg_id, stored=True, dispatch=True)
    except IntegrityError:
        existing, original = stored_copy(storage, msg_id, sender, payload["client_msg_id"])
        if existing is not None:
            invalidate_conversation_lists(storage, [sender, to])  # the first attempt may have died before it
            return PersistOutcome(msg_id, stored=False, dispatch=True)
        if original is not None:
            return PersistOutcome(original, stored=False, dispatch=False)
        raise


def persist_private_messages(storage: Storage, payloads: list[dict]) -> list[PersistOutcome]:
    """Store many private messages in one transaction: one commit, one sequence bump
    per user, multi-row inserts. This is what makes persist keep up under load.

    Taken for the common case, all of them new. If any is already stored (a
    redelivery, or a second copy of a send), the batch is rolled back and each
    message goes through `persist_private_message` on its own, which knows
    every case; one whose id another message holds (IdCollision) comes back
    `collided`, for the caller to quarantine, so it cannot hold up the others.
    """
    if len(payloads) <= 1:
        return [_persist_alone(storage, payload) for payload in payloads]
    try:
        _store(storage, payloads)
    except IntegrityError:
        log.info("batch of %d holds a message stored before; persisting one by one", len(payloads))
        return [_persist_alone(storage, payload) for payload in payloads]
    return [PersistOutcome(int(p["msg_id"]), stored=True, dispatch=True) for p in payloads]


def _store(storage: Storage, payloads: list[dict]) -> None:
    """One transaction: the messages (their search index rows and media links), both parties' conversation rows moved to each one's
    newest message (in user order: one lock order, no deadlocks) and a stream entry per
    party, one sequence bump per user; then the parties' cached lists dropped. Raises
    IntegrityError (nothing written) if any message is stored already."""
    with storage.session() as session:
        session.execute(insert(Message), [_message_row(payload) for payload in payloads])
        index_messages(session, [IndexedMessage(int(p["msg_id"]), p["content"], int(p["sender_id"]), int(p["to"]),
                                                None) for p in payloads])
        link_media(session, [(int(p["msg_id"]), p["message_type"], p.get("extra")) for p in payloads])
        newest: dict[tuple[int, str], dict] = {}  # one row per (user, conversation): its newest message
        for payload in payloads:
            sender, to, msg_id = int(payload["sender_id"]), int(payload["to"]), int(payload["msg_id"])
            for user_id, peer in ((sender, to), (to, sender)):
                key = (user_id, payload["conversation_id"])
                if key not in newest or newest[key]["last_msg_id"] < msg_id:
                    newest[key] = {
                        "conversation_id": payload["conversation_id"], "user_id": user_id, "target_id": peer,
                        "is_group": False, "last_msg_id": msg_id, "last_message_time": int(payload["timestamp"]),
                        "last_message": message_preview(payload["message_type"], payload["content"])}
        upsert_conversations(session, storage.is_mysql, [newest[key] for key in sorted(newest)])
        append_entries(session, storage.is_mysql, [
            ([int(p["sender_id"]), int(p["to"])], int(p["msg_id"]), p["conversation_id"]) for p in payloads])
    storage.fence_writes(int(p["sender_id"]) for p in payloads)  # a sender reads their own message at once
    invalidate_conversation_lists(storage, [int(p[k]) for p in payloads for k in ("sender_id", "to")])


def _persist_alone(storage: Storage, payload: dict) -> PersistOutcome:
    try:
        return persist_private_message(storage, payload)
    except IdCollision:
        return PersistOutcome(int(payload["msg_id"]), stored=False, dispatch=False, collided=True)


def _message_row(payload: dict) -> dict:
    return {"id": int(payload["msg_id"]), "conversation_id": payload["conversation_id"],
            "sender_id": int(payload["sender_id"]), "receiver_id": int(payload["to"]), "group_id": None,
            "client_msg_id": payload["client_msg_id"], "message_type": payload["message_type"],
            "content": payload["content"], "extra": payload.get("extra") or None, "is_group": False,
            "timestamp": int(payload["timestamp"]), **reference_columns(payload)}


def reference_columns(payload: dict) -> dict:
    """The reply target and mentions of an accepted send; absent in tasks queued before 0016."""
    reply_to = payload.get("reply_to")
    return {"reply_to_msg_id": int(reply_to) if reply_to is not None else None,
            "mentions": [str(uid) for uid in payload.get("mentions") or []] or None}


def stored_copy(storage: Storage, msg_id: int, sender: int, client_msg_id: str) -> tuple[Message | None, int | None]:
    """After a failed insert: (this message, already stored: a redelivery) or (None, the id of
    another copy of the same send, dropped); (None, None) if neither explains the failure.

    Raises IdCollision when another message holds this id (two gateways made one id):
    never drop either silently.
    """
    with storage.sessions() as session:
        existing = session.get(Message, msg_id)
        if existing is not None and (existing.sender_id, existing.client_msg_id) != (sender, client_msg_id):
            log.critical("msg id %s collides with another message; dead-lettered for an operator", msg_id)
            raise IdCollision(f"msg id {msg_id} is taken by another message")
        if existing is not None:
            log.info("msg %s already persisted (redelivery)", msg_id)
            return existing, None
        original = session.scalar(select(Message.id).where(
            Message.sender_id == sender, Message.client_msg_id == client_msg_id))
    if original is not None:
        log.warning("msg %s is a second copy of msg %s (same client_msg_id); dropped", msg_id, original)
    return None, original


_UPSERT_SQL = {
    # Only VALUES() references after ON DUPLICATE KEY: PyMySQL then sends many
    # rows as one multi-row INSERT. MySQL assigns left to right: last_msg_id last.
    "mysql": """
        INSERT INTO conversation (conversation_id, user_id, target_id, is_group, last_message,
                                  last_message_time, last_msg_id)
        VALUES (:conversation_id, :user_id, :target_id, :is_group, :last_message, :last_message_time,
                :last_msg_id)
        ON DUPLICATE KEY UPDATE
          last_message = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), VALUES(last_message), last_message),
          last_message_time = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), VALUES(last_message_time),
                                 last_message_time),
          updated_at = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), NOW(), updated_at),
          last_msg_id = GREATEST(COALESCE(last_msg_id, 0), VALUES(last_msg_id))""",
    "sqlite": """
        INSERT INTO conversation (conversation_id, user_id, target_id, is_group, last_message,
                                  last_message_time, last_msg_id, created_at, updated_at)
        VALUES (:conversation_id, :user_id, :target_id, :is_group, :last_message, :last_message_time,
                :last_msg_id, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)
        ON CONFLICT (user_id, conversation_id) DO UPDATE SET
          last_message = excluded.last_message, last_message_time = excluded.last_message_time,
          last_msg_id = excluded.last_msg_id, updated_at = CURRENT_TIMESTAMP
        WHERE excluded.last_msg_id > COALESCE(conversation.last_msg_id, 0)""",
}


def upsert_conversations(session: Session, is_mysql: bool, rows: list[dict]) -> None:
    """Create each user's row for a conversation, or move it to this message if newer.

    rows: conversation_id, user_id, target_id, is_group, last_message,
    last_message_time, last_msg_id. Commits land out of id order, so an
    older message never overwrites a newer one.
    """
    if rows:
        session.execute(text(_UPSERT_SQL["mysql" if is_mysql else "sqlite"]), rows)

