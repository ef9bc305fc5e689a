"""Conversation list (cached in `conversations:{uid}`), history, membership."""
from __future__ import annotations

import json

from sqlalchemy import BigInteger, and_, literal, or_, select
from sqlalchemy.orm import aliased

from app.errors import Forbidden, InvalidInput, NotFound
from app.storage import Storage
from app.chat.unread import unread_counts
from models import DELETED_USER_NAME, ChatGroup, Conversation, GroupMember, Message, User

Peer = aliased(Conversation)  # the other party's row of a private chat

CACHE_KEY = "conversations:{}"
GENERATION_KEY = "conversations:{}:gen"  # bumped by every change to the list
CACHE_TTL = 3600
PREVIEW_CHARS = 200
HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT = 50, 200


# Store a freshly loaded list only if no change was announced since loading began;
# otherwise a list read just before a commit would hide that commit for an hour.
_STORE_IF_UNCHANGED = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


# KEYS: (cached list, generation) per user. ARGV: generation TTL.
_INVALIDATE = """
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i + 1])
  redis.call('EXPIRE', KEYS[i + 1], ARGV[1])
  redis.call('DEL', KEYS[i])
end
return #KEYS / 2
"""


def private_conversation_id(a: int, b: int) -> str:
    """The one conversation id of two users, whoever writes first."""
    low, high = sorted((a, b))
    return f"p_{low}_{high}"


def message_preview(message_type: str, content: str, limit: int = PREVIEW_CHARS) -> str:
    """What a list or a notification shows of a message: its text, or its kind."""
    return content[:limit] if message_type == "text" else f"[{message_type}]"


def invalidate_conversation_lists(storage: Storage, user_ids) -> None:
    """Drop the users' cached lists and announce the change (one round trip for a whole chunk)."""
    keys = [key for uid in set(user_ids) for key in (CACHE_KEY.format(uid), GENERATION_KEY.format(uid))]
    if keys:
        storage.script(_INVALIDATE)(keys=keys, args=[CACHE_TTL * 2])


def list_conversations(storage: Storage, user_id: int) -> list[dict]:
    """The user's conversations, most recent first, with live unread counts."""
    key, gen_key = CACHE_KEY.format(user_id), GENERATION_KEY.format(user_id)
    cached, generation = storage.redis.mget(key, gen_key)
    if cached is not None:
        items = json.loads(cached)
    else:
        items = _load_conversations(storage, user_id)
        storage.script(_STORE_IF_UNCHANGED)(
            keys=[key, gen_key], args=[generation or "0", json.dumps(items, ensure_ascii=False), CACHE_TTL])
    unread = unread_counts(storage, user_id)  # not cached with the list: it changes with every message
    return [dict(item, unread=unread.get(item["conversation_id"], 0)) for item in items]


def _membership_bounds(session, group_id: int, user_id: int) -> tuple[int, int | None]:
    row = session.execute(select(GroupMember.joined_seq, GroupMember.left_seq).where(
        GroupMember.group_id == group_id, GroupMember.user_id == user_id)).first()
    return (row.joined_seq, row.left_seq) if row is not None else (2**62, None)  # never a member: nothing


def _load_conversations(storage: Storage, user_id: int) -> list[dict]:
    # The primary, never the replica: a lagging read would be cached for an hour.
    with storage.sessions() as session:
        rows = session.execute(
            select(Conversation, User.username, ChatGroup.name, GroupMember.left_seq, User.deleted_at,
                   Peer.last_read_msg_id.label("peer_read"), Peer.last_delivered_msg_id.label("peer_delivered"))
            .outerjoin(User, (User.id == Conversation.target_id) & Conversation.is_group.is_(False))
            .outerjoin(Peer, (Peer.conversation_id == Conversation.conversation_id)
                       & (Peer.user_id == Conversation.target_id) & Conversation.is_group.is_(False))
            .outerjoin(ChatGroup, (ChatGroup.id == Conversation.target_id) & Conversation.is_group.is_(True))
            .outerjoin(GroupMember, (GroupMember.group_id == Conversation.target_id)
                       & (GroupMember.user_id == user_id) & Conversation.is_group.is_(True))
            .where(Conversation.user_id == user_id, ChatGroup.deleted_at.is_(None))  # a deleted group: in no list
            # New groups have no message yet: they come first, like a fresh conversation.
            .order_by(Conversation.last_message_time.is_(None).desc(), Conversation.last_message_time.desc(),
                      Conversation.id.desc())).all()
    return [{
        "conversation_id": conv.conversation_id,
        "is_group": conv.is_group,
        "peer": None if conv.is_group else {"user_id": str(conv.target_id),
                                            **({"username": DELETED_USER_NAME, "deleted": True} if deleted_at
                                               else {"username": username})},
        "group_id": str(conv.target_id) if conv.is_group else None,
        "group": {"name": group_name, "member": left_seq is None} if conv.is_group else None,
        "last_message": conv.last_message,
        "last_message_time": conv.last_message_time,
        "last_msg_id": str(conv.last_msg_id) if conv.last_msg_id else None,
        "last_read_msg_id": str(conv.last_read_msg_id) if conv.last_read_msg_id else None,
        # Private chats: how far the other party has read and received (a read is a delivery too).
        "peer_read_msg_id": _id_or_none(peer_read) if not conv.is_group else None,
        "peer_delivered_msg_id": _id_or_none(max(peer_delivered or 0, peer_read or 0)) if not conv.is_group else None,
    } for conv, username, group_name, left_seq, deleted_at, peer_read, peer_delivered in rows]


def _id_or_none(value) -> str | None:
    return str(value) if value else None


def require_member(session, user_id: int, conversation_id: str) -> Conversation:
    """The user's row of this conversation; 404 if no one has it, 403 if others do."""
    conv = session.scalar(select(Conversation).where(Conversation.user_id == user_id,
                                                     Conversation.conversation_id == conversation_id))
    if conv is not None:
        return conv
    exists = session.scalar(select(Conversation.id).where(Conversation.conversation_id == conversation_id).limit(1))
    if exists is None:
        raise NotFound(f"conversation {conversation_id!r} does not exist")
    raise Forbidden(f"you are not a member of conversation {conversation_id!r}")


def group_window(joined_seq, left_seq):
    """The visibility rule (app.chat.groups) as SQL: a member sees joined_seq < group_seq <= left_seq,
    left_seq NULL while still a member. The bounds are GroupMember's columns or literals."""
    return and_(Message.group_seq > joined_seq, or_(left_seq.is_(None), Message.group_seq <= left_seq))


def visible_messages(session, user_id: int, conversation_id: str | None = None):
    """SELECT of the messages this user may see: of one conversation (NotFound / Forbidden as
    require_member says), or of every conversation: private ones they are a party of, and
    in groups the messages of their membership windows."""
    if conversation_id is not None:
        conv = require_member(session, user_id, conversation_id)
        query = select(Message).where(Message.conversation_id == conversation_id)
        if conv.is_group:  # only what the member could see: from their join, until they left
            joined_seq, left_seq = _membership_bounds(session, conv.target_id, user_id)
            query = query.where(group_window(literal(joined_seq, BigInteger), literal(left_seq, BigInteger)))
        return query
    return select(Message).outerjoin(
        GroupMember, (GroupMember.group_id == Message.group_id) & (GroupMember.user_id == user_id)
    ).where(or_(
        and_(Message.is_group.is_(False), or_(Message.sender_id == user_id, Message.receiver_id == user_id)),
        and_(Message.is_group.is_(True), group_window(GroupMember.joined_seq, GroupMember.left_seq))))


def history(storage: Storage, user_id: int, conversation_id: str, before: int | None, limit: int,
            frame_of) -> dict:
    """Messages of a conversation, newest first, older than `before` (a msg_id).

    In a group, only the messages the member may see (app.chat.groups: from their
    latest join, none written after they left)."""
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise InvalidInput(f"'limit' must be from 1 to {HISTORY_MAX_LIMIT}")
    with storage.read_session_for(user_id) as session:
        query = visible_messages(session, user_id, conversation_id)
        if before is not None:
            query = query.where(Message.id < before)
        rows = session.scalars(query.order_by(Message.id.desc()).limit(limit + 1)).all()
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {"messages": [frame_of(m) for m in rows], "has_more": has_more,
            "next_before": str(rows[-1].id) if has_more else None}
