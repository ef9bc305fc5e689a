"""Unread counters: `unread:{uid}` in Redis, rebuilt from MySQL.

MySQL is the truth: a private message is unread by its receiver while its
status is 0; a group message is unread by a member who received it (it is in
their sync stream) while it is newer than their read position
(conversation.last_read_msg_id) and not their own or recalled. The Redis
hash caches the counts per conversation and carries `_seq`, the user's
sync-stream position the counts were taken at. Dispatch
counts a message only if its stream entry is newer than `_seq` (older ones
are in the rebuilt numbers already), and only once (`unread:counted:{msg}`).
"""
from __future__ import annotations

import time
import uuid

from sqlalchemy import func, select

from app.storage import Storage
from models import ENTRY_MESSAGE, STATUS_RECALLED, STATUS_UNREAD, Conversation, Message, SyncEntry, User

UNREAD_KEY = "unread:{}"
LOCK_KEY = "unread:rebuilding:{}"
_RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
COUNTED_KEY = "unread:counted:{}"
SEQ_FIELD = "_seq"
MAX_REBUILD_ROUNDS = 5
LOCK_HOLD_MS = 30_000

# One call counts a message for many receivers. KEYS: the message's counted
# set, then each receiver's unread hash. ARGV: conversation id, counted-set
# TTL, then (user id, stream position) per receiver.
_COUNT_SCRIPT = """
local counted = 0
for i = 2, #KEYS do
  local user, seq = ARGV[2 * i - 1], ARGV[2 * i]
  local built = redis.call('HGET', KEYS[i], '_seq')
  if built and tonumber(seq) > tonumber(built) and redis.call('SADD', KEYS[1], user) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[1], 1)
    counted = counted + 1
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return counted
"""


def count_unread(storage: Storage, messages: list[tuple[int, str, list[tuple[int, int]]]]) -> int:
    """Count newly dispatched messages, (msg id, conversation id, [(receiver, stream position)]) each,
    in one round trip: only for a receiver whose counters were built before that position, and
    only once per receiver (a redelivered dispatch counts nothing). Returns how many were counted."""
    script, pipe = storage.script(_COUNT_SCRIPT), storage.redis.pipeline(transaction=False)
    ttl = storage.settings.dedupe_ttl_seconds
    calls = 0
    for msg_id, conversation_id, receivers in messages:
        if receivers:
            script(keys=[COUNTED_KEY.format(msg_id)] + [UNREAD_KEY.format(uid) for uid, _ in receivers],
                   args=[conversation_id, ttl] + [v for pair in receivers for v in pair], client=pipe)
            calls += 1
    return sum(int(n) for n in pipe.execute()) if calls else 0


def forget_unread(storage: Storage, user_ids) -> None:
    """Drop cached counters; each is rebuilt from MySQL when next asked for."""
    keys = [UNREAD_KEY.format(uid) for uid in user_ids]
    for i in range(0, len(keys), 1000):
        storage.redis.delete(*keys[i:i + 1000])


def _unread_private(user_ids, *columns):
    """(receiver id, *columns) of the private messages these users have not read."""
    return select(Message.receiver_id, *columns).where(
        Message.receiver_id.in_(user_ids), Message.status == STATUS_UNREAD, Message.is_group.is_(False))


def _unread_in_groups(user_ids, *columns):
    """(member id, *columns) of the group messages these users have not read (see the module docstring)."""
    return (select(Conversation.user_id, *columns)
            .select_from(Message)
            .join(Conversation, Conversation.user_id.in_(user_ids)
                  & (Conversation.conversation_id == Message.conversation_id) & Conversation.is_group.is_(True))
            .join(SyncEntry, (SyncEntry.user_id == Conversation.user_id) & (SyncEntry.message_id == Message.id)
                  & (SyncEntry.kind == ENTRY_MESSAGE))
            .where(Message.id > func.coalesce(Conversation.last_read_msg_id, 0),
                   Message.sender_id != Conversation.user_id, Message.status != STATUS_RECALLED))


def latest_unread(session, user_id: int, limit: int, muted=()) -> list[Message]:
    """The user's newest unread messages, private and group, newest first (muted conversations left out)."""
    found = []
    for unread in (_unread_private, _unread_in_groups):
        query = unread([user_id], Message)
        if muted:
            query = query.where(Message.conversation_id.not_in(list(muted)))
        found.extend(row[1] for row in session.execute(query.order_by(Message.id.desc()).limit(limit)))
    return sorted(found, key=lambda m: m.id, reverse=True)[:limit]


def latest_unread_ids(session, muted_by_user: dict[int, list[str]]) -> dict[int, int]:
    """Per user, the id of their newest unread message outside their muted conversations
    (users with none left out), for many users in two set-based queries."""
    users = list(muted_by_user)
    newest: dict[int, int] = {}
    if not users:
        return newest
    muted = {uid: set(m) for uid, m in muted_by_user.items()}
    for unread in (_unread_private, _unread_in_groups):
        query = unread(users, Message.conversation_id, func.max(Message.id))
        for user_id, conversation_id, msg_id in session.execute(query.group_by(*query.selected_columns[:2])):
            if conversation_id not in muted[user_id] and msg_id > newest.get(user_id, 0):
                newest[user_id] = msg_id
    return newest


MENTION_SCAN_LIMIT = 200  # newest unread messages with mentions looked at per user and planning


def latest_unread_mentions(session, muted_by_user: dict[int, list[str]]) -> dict[int, int]:
    """Per user, the id of their newest unread group message that mentions them in a conversation
    they muted (a mention overrides the mute, docs/push.md §4.2); users with none left out.
    One query per user who muted a group; the JSON list is matched here, not in SQL (portable)."""
    newest: dict[int, int] = {}
    for user_id, muted in muted_by_user.items():
        groups = [cid for cid in muted if cid.startswith("g_")]
        if not groups:
            continue
        query = _unread_in_groups([user_id], Message.id, Message.mentions).where(
            Message.conversation_id.in_(groups), Message.mentions.is_not(None))
        for _, msg_id, mentions in session.execute(query.order_by(Message.id.desc()).limit(MENTION_SCAN_LIMIT)):
            if str(user_id) in (mentions or []):
                newest[user_id] = msg_id
                break
    return newest


def unread_states(session, wanted) -> dict[tuple[int, int], str | None]:
    """For (user id, msg id) pairs, in two queries: None while the message is unread by
    that user, else why not ("read", or "recalled").

    A message that does not exist counts as read.
    """
    wanted = set(wanted)
    if not wanted:
        return {}
    messages = {m.id: m for m in session.execute(
        select(Message.id, Message.status, Message.is_group, Message.receiver_id, Message.conversation_id)
        .where(Message.id.in_({msg_id for _, msg_id in wanted}))).all()}
    group_pairs = {(uid, messages[mid].conversation_id) for uid, mid in wanted
                   if mid in messages and messages[mid].is_group}
    read_upto = {}
    if group_pairs:  # a superset of the pairs (every user x every conversation); the exact ones are picked below
        read_upto = {(r.user_id, r.conversation_id): r.last_read_msg_id for r in session.execute(
            select(Conversation.user_id, Conversation.conversation_id, Conversation.last_read_msg_id)
            .where(Conversation.user_id.in_({uid for uid, _ in group_pairs}),
                   Conversation.conversation_id.in_({cid for _, cid in group_pairs}))).all()}
    states = {}
    for user_id, msg_id in wanted:
        message = messages.get(msg_id)
        if message is None:
            states[user_id, msg_id] = "read"
        elif message.status == STATUS_RECALLED:
            states[user_id, msg_id] = "recalled"
        elif not message.is_group:
            unread = message.receiver_id == user_id and message.status == STATUS_UNREAD
            states[user_id, msg_id] = None if unread else "read"
        else:
            unread = (read_upto.get((user_id, message.conversation_id)) or 0) < msg_id
            states[user_id, msg_id] = None if unread else "read"
    return states


def rebuild_unread(storage: Storage, user_ids, lock_wait: float = 10.0) -> dict[int, dict[str, int]]:
    """Recount these users' unread messages from MySQL into Redis; returns their counts.

    A user's counts and `_seq` come from one snapshot. If the stream moved while
    we wrote, a dispatch may have skipped a message the snapshot missed: recount.
    Rebuilds of one user run one at a time (a lock per user), so an older snapshot
    (taken before a read committed) never lands after a newer one; a lock held
    past `lock_wait` is a crashed holder's and is ignored.
    """
    todo = list(dict.fromkeys(user_ids))
    counts: dict[int, dict[str, int]] = {}
    rounds = dict.fromkeys(todo, 0)
    token, deadline = uuid.uuid4().hex, time.monotonic() + lock_wait
    release = storage.script(_RELEASE_SCRIPT)
    while todo:
        forced = time.monotonic() > deadline
        pipe = storage.redis.pipeline(transaction=False)
        for user_id in todo:
            pipe.set(LOCK_KEY.format(user_id), token, nx=True, px=LOCK_HOLD_MS)
        locked = [uid for uid, got in zip(todo, pipe.execute()) if got or forced]
        if not locked:
            time.sleep(0.01)
            continue
        try:
            seqs, found = _counts_from_mysql(storage, locked)
            pipe = storage.redis.pipeline(transaction=True)
            for user_id in locked:
                pipe.delete(UNREAD_KEY.format(user_id))
                pipe.hset(UNREAD_KEY.format(user_id), mapping={SEQ_FIELD: seqs[user_id], **found[user_id]})
            pipe.execute()
            with storage.sessions() as session:
                now = dict(session.execute(select(User.id, User.inbox_seq).where(User.id.in_(locked))).all())
        finally:
            pipe = storage.redis.pipeline(transaction=False)
            for user_id in locked:
                release(keys=[LOCK_KEY.format(user_id)], args=[token], client=pipe)
            pipe.execute()
        for user_id in locked:
            counts[user_id] = found[user_id]
            rounds[user_id] += 1
        done = {uid for uid in locked if (now.get(uid) or 0) == seqs[uid] or rounds[uid] >= MAX_REBUILD_ROUNDS}
        todo = [uid for uid in todo if uid not in done]
    return counts


def _counts_from_mysql(storage: Storage, user_ids: list[int]) -> tuple[dict[int, int], dict[int, dict[str, int]]]:
    """Per user, the sync-stream position and the unread count per conversation, from one snapshot."""
    counts: dict[int, dict[str, int]] = {user_id: {} for user_id in user_ids}
    with storage.session() as session:
        seqs = dict(session.execute(select(User.id, User.inbox_seq).where(User.id.in_(user_ids))).all())
        for unread in (_unread_private, _unread_in_groups):
            query = unread(user_ids, Message.conversation_id, func.count())
            for user_id, conversation_id, n in session.execute(query.group_by(*query.selected_columns[:2])):
                counts[user_id][conversation_id] = n
    return {user_id: seqs.get(user_id) or 0 for user_id in user_ids}, counts


def unread_totals(storage: Storage, user_ids) -> dict[int, int]:
    """Each user's total unread (the push badge): one Redis round trip; a user whose counters
    Redis lost is recounted from MySQL (`rebuild_unread`)."""
    user_ids = list(user_ids)
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.hgetall(UNREAD_KEY.format(user_id))
    cached = dict(zip(user_ids, pipe.execute() if user_ids else []))
    lost = [user_id for user_id, raw in cached.items() if SEQ_FIELD not in raw]
    rebuilt = rebuild_unread(storage, lost) if lost else {}
    totals = {}
    for user_id, raw in cached.items():
        counts = rebuilt[user_id] if user_id in rebuilt else \
            {cid: int(n) for cid, n in raw.items() if cid != SEQ_FIELD}
        totals[user_id] = sum(n for n in counts.values() if n > 0)
    return totals


def unread_counts(storage: Storage, user_id: int) -> dict[str, int]:
    """Per-conversation unread counts (zeros left out), rebuilt on a Redis miss."""
    raw = storage.redis.hgetall(UNREAD_KEY.format(user_id))
    if SEQ_FIELD not in raw:
        return {cid: n for cid, n in rebuild_unread(storage, [user_id])[user_id].items() if n > 0}
    return {cid: int(n) for cid, n in raw.items() if cid != SEQ_FIELD and int(n) > 0}
