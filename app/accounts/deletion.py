"""Self-service account deletion and data export (GDPR articles 17 and 20).

Deletion keeps the `user` row as a tombstone, so the messages the user sent stay with the
other parties and still name a sender: the username becomes "deleted:<id>" (":" is not
allowed in usernames, so no account can hold it), the password hash is wiped, `deleted_at`
and `disabled_at` are set (every "active accounts" check already excludes disabled ones) and
the old username is reserved in `username_reservation` for USERNAME_REUSE_DAYS. Lookups of a
deleted user answer the username "deleted user" with `"deleted": true`.

Everything else the account owns goes: the rows of `OWNED_ROWS` (add a table there and
deletion and export both cover it), group memberships (a group the user owned passes to its
longest-standing admin, else member; one they were alone in is deleted; the other members get the
group events, app.chat.group_events), and the user's Redis keys; its sockets are closed.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from sqlalchemy import delete, select, tuple_, update

from app.accounts.audit import ACTOR_OPERATOR, ACTOR_USER, USER_DELETED, record_in
from app.accounts.auth import authenticate
from app.accounts.sessions import forget_sessions
from app.accounts.status import cut_off
from app.chat.conversations import invalidate_conversation_lists
from app.chat.group_events import DELETED, MEMBER_REMOVED, ROLE_CHANGED, announce, record_event
from app.chat.unread import forget_unread
from app.errors import Forbidden, NotFound, Unauthorized
from app.storage import Storage
from models import (AuthSession, ChatGroup, Conversation, Device, GroupMember, Media, Message, OfflineMessageIndex, PushLog,
                    PushSetting, SyncEntry, User, UserBlock, UsernameReservation)

log = logging.getLogger(__name__)

TOMBSTONE = "deleted:{}"
DELETE_BATCH = 1000
# (model, the column naming the account): rows deleted with the account, in batches.
OWNED_ROWS = [
    (Device, Device.user_id),
    (PushSetting, PushSetting.user_id),
    (PushLog, PushLog.user_id),
    (OfflineMessageIndex, OfflineMessageIndex.user_id),
    (Conversation, Conversation.user_id),
    (SyncEntry, SyncEntry.user_id),
    (UserBlock, UserBlock.blocker_id),
    (UserBlock, UserBlock.blocked_id),
]
_REDIS_KEYS = ("blocks:{}", "push:coalesce:{}", "push:digest:{}", "push:shown:{}", "push:badgesync:{}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def delete_account(storage: Storage, user_id: int, password: str) -> None:
    """Delete the account whose current password this is (Forbidden otherwise)."""
    settings = storage.settings
    with storage.sessions() as session:
        user = session.get(User, user_id)
        if user is None or user.deleted_at is not None:
            raise Unauthorized("invalid token: the account does not exist")
        try:
            authenticate(session, settings, user.username, password)
        except Unauthorized:
            raise Forbidden("wrong password: the account was not deleted") from None
    erase_account(storage, user_id, user_id, ACTOR_USER)


def delete_user_by_name(storage: Storage, username: str) -> int:
    """The operator's `delete-user`: delete the account named so (NotFound if none); returns its id."""
    with storage.sessions() as session:
        user_id = session.scalar(select(User.id).where(User.username == username, User.deleted_at.is_(None)))
    if user_id is None:
        raise NotFound(f"no user named {username!r}")
    erase_account(storage, user_id, None, ACTOR_OPERATOR)
    return user_id


def erase_account(storage: Storage, user_id: int, actor_id: int | None, actor: str) -> None:
    """Delete the account (no check here: the callers authenticated the request)."""
    settings = storage.settings
    now = _now_ms()
    with storage.session() as session:
        # The user's groups before the user row: a group change locks the group, then its members' rows.
        session.execute(select(ChatGroup.id).where(ChatGroup.id.in_(select(GroupMember.group_id).where(
            GroupMember.user_id == user_id, GroupMember.left_seq.is_(None)))).order_by(ChatGroup.id).with_for_update())
        user = session.scalar(select(User).where(User.id == user_id).with_for_update())
        if user is None or user.deleted_at is not None:
            return  # deleted meanwhile: nothing left to do
        old_username = user.username
        peers = _peers(session, user_id)
        group_events, stale_lists = _leave_groups(session, storage.is_mysql, user_id, now)
        user.username, user.password_hash = TOMBSTONE.format(user_id), "!deleted"
        user.deleted_at, user.disabled_at, user.is_admin = now, user.disabled_at or now, False
        user.presence_visibility = "nobody"
        session.merge(UsernameReservation(username=old_username, user_id=user_id,
                                          until_ms=now + settings.username_reuse_days * 86_400_000))
        record_in(session, actor_id, actor, USER_DELETED, "user", user_id,
                  {"reserved_days": settings.username_reuse_days})
    for model, column in OWNED_ROWS:
        _delete_rows(storage, model, column, user_id)
    try:
        storage.redis.delete(*(key.format(user_id) for key in _REDIS_KEYS))
        forget_unread(storage, [user_id])
    except Exception as exc:  # nothing there is needed any more; the keys expire
        log.warning("user %s deleted, Redis keys left to expire: %s", user_id, exc.__class__.__name__)
    invalidate_conversation_lists(storage, peers | stale_lists | {user_id})  # their lists name "deleted user" now
    announce(storage, group_events)  # after the commit, as every group change
    forget_sessions(storage, user_id)
    cut_off(storage, user_id, "account deleted")
    log.info("user %s deleted (by %s %s)", user_id, actor, actor_id)


def _peers(session, user_id: int) -> set[int]:
    private = session.scalars(select(Conversation.user_id).where(
        Conversation.target_id == user_id, Conversation.is_group.is_(False))).all()
    groups = select(GroupMember.group_id).where(GroupMember.user_id == user_id, GroupMember.left_seq.is_(None))
    members = session.scalars(select(GroupMember.user_id).where(
        GroupMember.group_id.in_(groups), GroupMember.left_seq.is_(None))).all()
    return (set(private) | set(members)) - {user_id}


def _leave_groups(session, is_mysql: bool, user_id: int, now: int) -> tuple[list, set[int]]:
    """Leave every group (its owner hands it on first; a group with nobody left is deleted), then
    drop the membership rows. Returns the group events for the remaining members
    (app.chat.group_events) and the former members of deleted groups (their lists drop them)."""
    group_ids = sorted(session.scalars(select(GroupMember.group_id).where(
        GroupMember.user_id == user_id, GroupMember.left_seq.is_(None))).all())
    events, stale = [], set()
    for group_id in group_ids:  # the group rows' order: the one lock order of group writers
        group = session.scalar(select(ChatGroup).where(ChatGroup.id == group_id).with_for_update())
        if group is None or group.deleted_at is not None:
            continue
        session.execute(update(GroupMember).where(GroupMember.group_id == group_id, GroupMember.user_id == user_id)
                        .values(left_seq=group.msg_seq, left_at=now))
        remaining = list(session.scalars(select(GroupMember.user_id).where(
            GroupMember.group_id == group_id, GroupMember.left_seq.is_(None))).all())
        if group.owner_id == user_id:
            heir = session.scalar(select(GroupMember).where(
                GroupMember.group_id == group_id, GroupMember.left_seq.is_(None))
                .order_by((GroupMember.role == "admin").desc(), GroupMember.joined_at, GroupMember.id).limit(1))
            if heir is None:  # the owner was the last member: as their leaving would, it deletes the group
                group.deleted_at = now
                events.append(record_event(session, is_mysql, group_id, DELETED, user_id, [], [], name=group.name))
                stale |= set(session.scalars(select(Conversation.user_id).where(
                    Conversation.conversation_id == f"g_{group_id}")).all())
                continue
            heir.role, group.owner_id = "owner", heir.user_id
            events.append(record_event(session, is_mysql, group_id, ROLE_CHANGED, user_id, [heir.user_id],
                                       remaining, name=group.name, role="owner"))
        events.append(record_event(session, is_mysql, group_id, MEMBER_REMOVED, user_id, [user_id], remaining,
                                   name=group.name))
    session.execute(delete(GroupMember).where(GroupMember.user_id == user_id))
    return events, stale


def _delete_rows(storage: Storage, model, column, user_id: int) -> None:
    """Delete in primary-key batches of one transaction each (no long lock on a big table)."""
    key = list(model.__table__.primary_key.columns)
    while True:
        with storage.session() as session:
            keys = session.execute(select(*key).where(column == user_id).limit(DELETE_BATCH)).all()
            if keys:
                session.execute(delete(model).where(tuple_(*key).in_([tuple(row) for row in keys])))
        if len(keys) < DELETE_BATCH:
            return


def reserved_username(session, username: str, now_ms: int | None = None) -> bool:
    """Whether a deleted account still holds this username (an expired hold is dropped)."""
    row = session.get(UsernameReservation, username)
    if row is None:
        return False
    if row.until_ms > (_now_ms() if now_ms is None else now_ms):
        return True
    session.delete(row)
    session.flush()
    return False


# --- export ---------------------------------------------------------------------

EXPORT_PAGE = 500


def _redact(token: str) -> str:
    return "…" + token[-4:] if len(token) > 4 else "…"


def export_account(storage: Storage, user_id: int) -> Iterator[str]:
    """The user's data as one JSON document, in pieces (messages are read a page at a time)."""
    with storage.sessions() as session:
        user = session.get(User, user_id)
        profile = {"user_id": str(user.id), "username": user.username, "is_admin": user.is_admin,
                   "created_at": user.created_at.isoformat() if user.created_at else None}
        privacy = {"presence": user.presence_visibility}
        devices = [{"device_id": str(d.id), "platform": d.platform, "token": _redact(d.token),
                    "created_at": d.created_at.isoformat() if d.created_at else None}
                   for d in session.scalars(select(Device).where(Device.user_id == user_id).order_by(Device.id))]
        setting = session.get(PushSetting, user_id)
        push_settings = None if setting is None else {
            "channels": setting.channels, "email": setting.email, "email_verified": setting.email_verified_at is not None,
            "muted_conversations": setting.muted_conversations, "dnd_start": setting.dnd_start,
            "dnd_end": setting.dnd_end, "time_zone": setting.time_zone, "preview": setting.preview}
        blocks = [str(uid) for uid in session.scalars(select(UserBlock.blocked_id).where(
            UserBlock.blocker_id == user_id).order_by(UserBlock.blocked_id))]
        conversations = [{"conversation_id": c.conversation_id, "is_group": c.is_group, "target_id": str(c.target_id),
                          "last_read_msg_id": str(c.last_read_msg_id) if c.last_read_msg_id else None}
                         for c in session.scalars(select(Conversation).where(Conversation.user_id == user_id)
                                                  .order_by(Conversation.id))]
        groups = [{"group_id": str(m.group_id), "name": name, "role": m.role, "joined_at": m.joined_at,
                   "left_at": m.left_at}
                  for m, name in session.execute(select(GroupMember, ChatGroup.name)
                                                 .outerjoin(ChatGroup, ChatGroup.id == GroupMember.group_id)
                                                 .where(GroupMember.user_id == user_id).order_by(GroupMember.id))]
        sessions = [{"session_id": a.id, "created_at": a.created_at_ms, "last_used_at": a.last_used_at_ms,
                     "revoked_at": a.revoked_at_ms, "revoked_reason": a.revoked_reason, "user_agent": a.user_agent,
                     "ip": a.ip}  # never a token: only their hashes are stored, and those are not exported
                    for a in session.scalars(select(AuthSession).where(AuthSession.user_id == user_id)
                                             .order_by(AuthSession.created_at_ms))]
        media = [{"media_id": str(m.id), "content_type": m.content_type, "size": m.size, "filename": m.filename,
                  "sha256": m.sha256, "created_at": m.created_at_ms}
                 for m in session.scalars(select(Media).where(Media.uploader_id == user_id).order_by(Media.id))]
    head = {"exported_at": _now_ms(), "profile": profile, "privacy": privacy, "devices": devices,
            "push_settings": push_settings, "blocks": blocks, "conversations": conversations, "groups": groups,
            "media": media, "sessions": sessions}
    yield json.dumps(head, ensure_ascii=False)[:-1] + ', "messages_sent": ['
    after, first = 0, True
    while True:
        with storage.sessions() as session:
            page = session.scalars(select(Message).where(Message.sender_id == user_id, Message.id > after)
                                   .order_by(Message.id).limit(EXPORT_PAGE)).all()
        for msg in page:
            yield ("" if first else ", ") + json.dumps({
                "msg_id": str(msg.id), "conversation_id": msg.conversation_id,
                "to": str(msg.receiver_id) if msg.receiver_id is not None else None,
                "group_id": str(msg.group_id) if msg.group_id is not None else None,
                "message_type": msg.message_type, "content": msg.content, "extra": msg.extra or {},
                "timestamp": msg.timestamp, "status": msg.status, "recalled_at": msg.recalled_at,
            }, ensure_ascii=False)
            first = False
        if len(page) < EXPORT_PAGE:
            break
        after = page[-1].id
    yield "]}"
