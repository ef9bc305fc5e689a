"""Presence privacy: who may see whether a user is online and when they were last seen.

`everyone` (the default), `contacts` (users who share a conversation with them: a private
chat either of them has, or a group both are current members of) or `nobody`. A user the
target blocked never sees it, whatever the setting. The user always sees their own.
"""
from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import aliased

from app.accounts.blocks import blocked_by_sql
from app.chat.conversations import private_conversation_id
from app.errors import InvalidInput, NotFound
from app.storage import Storage
from models import Conversation, GroupMember, User

PRESENCE_VISIBILITIES = ("everyone", "contacts", "nobody")
PRESENCE_HIDDEN_MESSAGE = "this user's presence is not visible to you"


def parse_presence_visibility(value) -> str:
    if value not in PRESENCE_VISIBILITIES:
        raise InvalidInput(f"'presence' must be one of {', '.join(PRESENCE_VISIBILITIES)}")
    return value


def privacy_of(storage: Storage, user_id: int) -> dict:
    with storage.sessions() as session:
        visibility = session.scalar(select(User.presence_visibility).where(User.id == user_id))
    return {"presence": visibility or "everyone"}


def set_privacy(storage: Storage, user_id: int, presence: str) -> dict:
    with storage.session() as session:
        session.execute(update(User).where(User.id == user_id).values(presence_visibility=presence))
    return {"presence": presence}


def share_a_conversation(session, a: int, b: int) -> bool:
    """A private chat between them (either side's row), or a group both are current members of."""
    if session.scalar(select(Conversation.id).where(
            Conversation.conversation_id == private_conversation_id(a, b)).limit(1)) is not None:
        return True
    mine, theirs = aliased(GroupMember), aliased(GroupMember)
    return session.scalar(select(mine.group_id).join(theirs, theirs.group_id == mine.group_id).where(
        mine.user_id == a, mine.left_seq.is_(None), theirs.user_id == b, theirs.left_seq.is_(None)
    ).limit(1)) is not None


def may_see_presence(storage: Storage, viewer_id: int, target_id: int) -> bool:
    """Whether `viewer_id` may see `target_id`'s presence; NotFound for an unknown or deleted user."""
    if viewer_id == target_id:
        return True
    with storage.sessions() as session:
        target = session.get(User, target_id) if 0 < target_id < 2**63 else None
        if target is None or target.deleted_at is not None:
            raise NotFound(f"user {target_id} does not exist")
        if target.presence_visibility == "nobody" or blocked_by_sql(session, target_id, [viewer_id]):
            return False
        if target.presence_visibility == "contacts":
            return share_a_conversation(session, viewer_id, target_id)
        return True
