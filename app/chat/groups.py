"""Groups and membership: who is in a group, who may change it, who sees what.

Visibility rule: every group message gets the group's next sequence number
(`message.group_seq`) under the group row lock, and every membership change
takes the same lock. A member sees the messages with
joined_seq < group_seq <= left_seq (left_seq NULL while still a member): the
history from their latest join onward, and none written after they left or
were removed. Because both sides serialise on one row, the rule agrees with
commit order exactly; delivery, sync, history and unread all apply it.

Every change is also a group event (app.chat.group_events), written in the
change's transaction and announced to the affected users after its commit.
"""
from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.accounts.blocks import blockers_among
from app.chat.conversations import invalidate_conversation_lists
from app.chat.group_events import (
    CREATED, DELETED, MEMBER_ADDED, MEMBER_REMOVED, RENAMED, ROLE_CHANGED, announce, record_event,
)
from app.chat.typing import forget_parties
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.storage import Storage, insert_ignoring_duplicates
from models import ChatGroup, Conversation, GroupMember, User

OWNER, ADMIN, MEMBER = "owner", "admin", "member"
ROLES = (OWNER, ADMIN, MEMBER)
MAX_NAME_CHARS = 100


def group_conversation_id(group_id: int) -> str:
    return f"g_{group_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def clean_group_name(name) -> str:
    if not isinstance(name, str):
        raise InvalidInput("'name' must be a string")
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"'name' must be 1 to {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise InvalidInput("'name' must not contain control characters")
    return name


# --- locks and sequence --------------------------------------------------------

def lock_group(session: Session, group_id: int) -> ChatGroup:
    """The group row, locked until commit: membership changes and sends take turns."""
    group = session.scalar(select(ChatGroup).where(ChatGroup.id == group_id).with_for_update())
    if group is None or group.deleted_at is not None:
        raise NotFound(f"group {group_id} does not exist")
    return group


def next_group_seq(session: Session, is_mysql: bool, group_id: int) -> int:
    """The group's next message sequence number (locks the group row until commit)."""
    if is_mysql:
        result = session.execute(update(ChatGroup).where(ChatGroup.id == group_id)
                                 .values(msg_seq=func.last_insert_id(ChatGroup.msg_seq + 1)))
        if result.rowcount == 0:
            raise NotFound(f"group {group_id} does not exist")
        return int(session.scalar(select(func.last_insert_id())))
    seq = session.execute(update(ChatGroup).where(ChatGroup.id == group_id)
                          .values(msg_seq=ChatGroup.msg_seq + 1).returning(ChatGroup.msg_seq)).scalar()
    if seq is None:
        raise NotFound(f"group {group_id} does not exist")
    return int(seq)


def recipients_of(session: Session, group_id: int, group_seq: int) -> list[int]:
    """Who sees the group message numbered group_seq (the visibility rule), in id order."""
    return list(session.scalars(select(GroupMember.user_id).where(
        GroupMember.group_id == group_id, GroupMember.joined_seq < group_seq,
        (GroupMember.left_seq.is_(None)) | (GroupMember.left_seq >= group_seq),
    ).order_by(GroupMember.user_id)).all())


def current_membership(session: Session, group_id: int, user_id: int) -> GroupMember | None:
    return session.scalar(select(GroupMember).where(
        GroupMember.group_id == group_id, GroupMember.user_id == user_id, GroupMember.left_seq.is_(None)))


def require_current_member(session: Session, group_id: int, user_id: int) -> GroupMember:
    """The user's membership; 404 if the group does not exist, 403 if they are not in it."""
    member = current_membership(session, group_id, user_id)
    if member is not None:
        return member
    group = session.get(ChatGroup, group_id)
    if group is None or group.deleted_at is not None:  # a deleted group has no members
        raise NotFound(f"group {group_id} does not exist")
    raise Forbidden(f"you are not a member of group {group_id}")


# --- membership changes ----------------------------------------------------------

@dataclass(frozen=True)
class GroupCreated:
    group_id: int
    conversation_id: str
    members: list[int]


def create_group(storage: Storage, owner_id: int, name, member_ids: list[int]) -> GroupCreated:
    """A new group: the creator is its owner, the named users its members."""
    name = clean_group_name(name)
    members = sorted(set(member_ids) - {owner_id})
    _check_size(storage, len(members) + 1)
    with storage.session() as session:
        _require_users(session, members)
        _refuse_blockers(session, members, owner_id)
        group = ChatGroup(name=name, owner_id=owner_id, msg_seq=0)
        session.add(group)
        session.flush()
        now = _now_ms()
        session.add(GroupMember(group_id=group.id, user_id=owner_id, role=OWNER, joined_at=now, joined_seq=0))
        session.add_all(GroupMember(group_id=group.id, user_id=uid, role=MEMBER, joined_at=now, joined_seq=0)
                        for uid in members)
        _ensure_conversation_rows(session, storage.is_mysql, group.id, [owner_id, *members])
        group_id = group.id
        event = record_event(session, storage.is_mysql, group_id, CREATED, owner_id, [owner_id, *members],
                             [owner_id, *members], name=name)
    invalidate_conversation_lists(storage, [owner_id, *members])
    announce(storage, [event])
    return GroupCreated(group_id, group_conversation_id(group_id), [owner_id, *members])


def add_members(storage: Storage, actor_id: int, group_id: int, user_ids: list[int]) -> list[int]:
    """Add users (owner or group admin only); returns those who were not members already.

    A returning member sees history from this join onward.
    """
    wanted = sorted(set(user_ids))
    with storage.session() as session:
        group = lock_group(session, group_id)
        actor = require_current_member(session, group_id, actor_id)
        if actor.role not in (OWNER, ADMIN):
            raise Forbidden("only the group owner or a group admin can add members")
        _require_users(session, wanted)
        rows = {m.user_id: m for m in session.scalars(select(GroupMember).where(
            GroupMember.group_id == group_id, GroupMember.user_id.in_(wanted))).all()} if wanted else {}
        added = [uid for uid in wanted if uid not in rows or rows[uid].left_seq is not None]
        _refuse_blockers(session, added, actor_id)
        current = session.scalar(select(func.count()).select_from(GroupMember).where(
            GroupMember.group_id == group_id, GroupMember.left_seq.is_(None)))
        _check_size(storage, current + len(added))
        now = _now_ms()
        for uid in added:
            row = rows.get(uid)
            if row is None:
                session.add(GroupMember(group_id=group_id, user_id=uid, role=MEMBER, joined_at=now,
                                        joined_seq=group.msg_seq))
            else:  # rejoining: a new membership, history from now on
                row.role, row.joined_at, row.joined_seq, row.left_seq, row.left_at = \
                    MEMBER, now, group.msg_seq, None, None
        _ensure_conversation_rows(session, storage.is_mysql, group_id, added)
        events = [record_event(session, storage.is_mysql, group_id, MEMBER_ADDED, actor_id, added,
                               _current_members(session, group_id), name=group.name)] if added else []
    invalidate_conversation_lists(storage, added)
    announce(storage, events)
    forget_parties(storage, [group_conversation_id(group_id)])  # typing reaches the new members
    return added


def remove_member(storage: Storage, actor_id: int, group_id: int, user_id: int) -> None:
    """Remove a member (owner; admins remove plain members) or leave (the member themselves).

    From this commit on the user gets none of the group's new messages, cannot
    send to it and cannot read what is written after; the history they saw stays theirs.
    """
    former = None
    with storage.session() as session:
        group = lock_group(session, group_id)
        actor = require_current_member(session, group_id, actor_id)
        target = actor if user_id == actor_id else current_membership(session, group_id, user_id)
        if target is None:
            raise NotFound(f"user {user_id} is not a member of group {group_id}")
        if user_id == actor_id and actor.role == OWNER:
            if _member_count(session, group_id) > 1:
                raise Conflict("the owner cannot leave while others remain: make another member owner first "
                               "(PATCH /api/groups/{group_id}/members/{user_id} with role 'owner'), "
                               "or delete the group (DELETE /api/groups/{group_id})")
            event, former = _delete_locked(session, storage.is_mysql, group, actor_id)  # the last one out
        elif user_id == actor_id or actor.role == OWNER or (actor.role == ADMIN and target.role == MEMBER):
            target.left_seq, target.left_at = group.msg_seq, _now_ms()
            session.flush()
            event = record_event(session, storage.is_mysql, group_id, MEMBER_REMOVED, actor_id, [user_id],
                                 [*_current_members(session, group_id), user_id], name=group.name)
        else:
            raise Forbidden("only the group owner, or a group admin for plain members, can remove members")
    if former is not None:  # the owner was the last member: the group is deleted
        _after_delete(storage, event, former)
        return
    invalidate_conversation_lists(storage, [user_id])
    announce(storage, [event])
    forget_parties(storage, [group_conversation_id(group_id)])  # no more typing to or from them


def set_role(storage: Storage, actor_id: int, group_id: int, user_id: int, role) -> None:
    """The owner makes a member admin or plain member, or hands ownership over (becoming admin)."""
    if role not in ROLES:
        raise InvalidInput(f"'role' must be one of {', '.join(ROLES)}")
    with storage.session() as session:
        group = lock_group(session, group_id)
        actor = require_current_member(session, group_id, actor_id)
        if actor.role != OWNER:
            raise Forbidden("only the group owner can change roles")
        target = current_membership(session, group_id, user_id)
        if target is None:
            raise NotFound(f"user {user_id} is not a member of group {group_id}")
        if target.user_id == actor_id:
            if role != OWNER:
                raise Conflict("the owner cannot demote themselves: make another member owner instead")
            return
        if target.role == role:
            return  # nothing changes: no event
        target.role = role
        if role == OWNER:
            actor.role, group.owner_id = ADMIN, user_id
        members = _current_members(session, group_id)
        events = [record_event(session, storage.is_mysql, group_id, ROLE_CHANGED, actor_id, [user_id], members,
                               name=group.name, role=role)]
        if role == OWNER:  # the handover: the former owner is an admin now
            events.append(record_event(session, storage.is_mysql, group_id, ROLE_CHANGED, actor_id, [actor_id],
                                       members, name=group.name, role=ADMIN))
    announce(storage, events)


def rename_group(storage: Storage, actor_id: int, group_id: int, name) -> None:
    """The owner or a group admin renames the group; every member's list shows the new name."""
    name = clean_group_name(name)
    with storage.session() as session:
        group = lock_group(session, group_id)
        if require_current_member(session, group_id, actor_id).role not in (OWNER, ADMIN):
            raise Forbidden("only the group owner or a group admin can rename the group")
        changed = group.name != name
        group.name = name
        members = session.scalars(select(GroupMember.user_id).where(GroupMember.group_id == group_id)).all()
        events = [record_event(session, storage.is_mysql, group_id, RENAMED, actor_id, [],
                               _current_members(session, group_id), name=name)] if changed else []
    invalidate_conversation_lists(storage, members)  # former members' lists show the name too
    announce(storage, events)


def delete_group(storage: Storage, actor_id: int, group_id: int) -> None:
    """The owner deletes the group: every member leaves it (their history of it stays theirs and
    in their streams), it leaves every list, and sends to it are refused (not_found)."""
    with storage.session() as session:
        group = lock_group(session, group_id)
        if require_current_member(session, group_id, actor_id).role != OWNER:
            raise Forbidden("only the group owner can delete the group")
        event, former = _delete_locked(session, storage.is_mysql, group, actor_id)
    _after_delete(storage, event, former)


def _delete_locked(session: Session, is_mysql: bool, group: ChatGroup, actor_id: int):
    """Close every membership at the group's last message and mark the group deleted (lock held)."""
    members = _current_members(session, group.id)
    now = _now_ms()
    session.execute(update(GroupMember).where(GroupMember.group_id == group.id, GroupMember.left_seq.is_(None))
                    .values(left_seq=group.msg_seq, left_at=now))
    group.deleted_at = now
    event = record_event(session, is_mysql, group.id, DELETED, actor_id, [], members, name=group.name)
    former = session.scalars(select(Conversation.user_id).where(
        Conversation.conversation_id == group_conversation_id(group.id))).all()
    return event, former


def _after_delete(storage: Storage, event, former) -> None:
    invalidate_conversation_lists(storage, former)  # the group leaves every list, former members' too
    announce(storage, [event])
    forget_parties(storage, [event.frame["conversation_id"]])  # no more typing in it


def _current_members(session: Session, group_id: int) -> list[int]:
    return list(session.scalars(select(GroupMember.user_id).where(
        GroupMember.group_id == group_id, GroupMember.left_seq.is_(None))).all())


def _member_count(session: Session, group_id: int) -> int:
    return session.scalar(select(func.count()).select_from(GroupMember).where(
        GroupMember.group_id == group_id, GroupMember.left_seq.is_(None)))


def _check_size(storage: Storage, count: int) -> None:
    limit = storage.settings.group_max_members
    if count > limit:
        raise Conflict(f"a group holds at most {limit} members (this change would make {count})")


def _require_users(session: Session, user_ids: list[int]) -> None:
    if not user_ids:
        return
    found = set(session.scalars(select(User.id).where(User.id.in_(user_ids))).all())
    missing = [str(uid) for uid in user_ids if uid not in found]
    if missing:
        raise NotFound(f"no such user: {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}")


def _refuse_blockers(session: Session, user_ids: list[int], actor_id: int) -> None:
    """A user who blocked the actor is not added to a group by them (403)."""
    refusing = sorted(blockers_among(session, user_ids, actor_id))
    if refusing:
        raise Forbidden(f"you cannot add user {refusing[0]} to a group")


def _ensure_conversation_rows(session: Session, is_mysql: bool, group_id: int, user_ids) -> None:
    """Each member's conversation-list row for the group (kept if it exists)."""
    if not user_ids:
        return
    cid = group_conversation_id(group_id)
    session.execute(insert_ignoring_duplicates(Conversation, is_mysql), [
        {"conversation_id": cid, "user_id": uid, "target_id": group_id, "is_group": True}
        for uid in user_ids])


# --- reads -----------------------------------------------------------------------

def my_groups(storage: Storage, user_id: int) -> list[dict]:
    with storage.sessions() as session:
        counts = select(GroupMember.group_id, func.count().label("n")).where(
            GroupMember.left_seq.is_(None)).group_by(GroupMember.group_id).subquery()
        rows = session.execute(
            select(ChatGroup, GroupMember.role, counts.c.n)
            .join(GroupMember, GroupMember.group_id == ChatGroup.id)
            .join(counts, counts.c.group_id == ChatGroup.id)
            .where(GroupMember.user_id == user_id, GroupMember.left_seq.is_(None), ChatGroup.deleted_at.is_(None))
            .order_by(ChatGroup.id)).all()
    return [{"group_id": str(g.id), "conversation_id": group_conversation_id(g.id), "name": g.name, "role": role,
             "member_count": n, "owner_id": str(g.owner_id)} for g, role, n in rows]


def members_of(storage: Storage, user_id: int, group_id: int) -> list[dict]:
    with storage.sessions() as session:
        require_current_member(session, group_id, user_id)
        rows = session.execute(
            select(GroupMember, User.username).join(User, User.id == GroupMember.user_id)
            .where(GroupMember.group_id == group_id, GroupMember.left_seq.is_(None))
            .order_by(GroupMember.joined_at, GroupMember.id)).all()
    return [{"user_id": str(m.user_id), "username": name, "role": m.role, "joined_at": m.joined_at}
            for m, name in rows]


def require_sender(storage: Storage, user_id: int, group_id: int) -> None:
    """A send to a group: only its current members may (read from MySQL: removal counts at once)."""
    with storage.sessions() as session:
        require_current_member(session, group_id, user_id)
