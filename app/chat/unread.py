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
from contextlib import contextmanager

from sqlalchemy import func, select

from app.storage import Storage
from models import ENTRY_MESSAGE, STATUS_RECALLED, STATUS_UNREAD, Conversation, Message, SyncEntry, User

UNREAD_KEY = "unread:{}"
LOCK_KEY = "unread:rebuilding:{}"
_RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
COUNTED_KEY = "unread:counted:{}"
SEQ_FIELD = "_seq"
MAX_REBUILD_ROUNDS = 5

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


def count_unread(storage: Storage, user_id: int, msg_id: int, conversation_id: str, entry_seq: int) -> bool:
    """Count one newly dispatched message for its receiver; harmless if repeated."""
    return count_unread_many(storage, msg_id, conversation_id, [(user_id, entry_seq)]) == 1


def count_unread_many(storage: Storage, msg_id: int, conversation_id: str,
                      receivers: list[tuple[int, int]]) -> int:
    """Count a message for its receivers (user id, stream position): only for a
    receiver whose counters were built before that position, and only once."""
    if not receivers:
        return 0
    keys = [COUNTED_KEY.format(msg_id)] + [UNREAD_KEY.format(uid) for uid, _ in receivers]
    args = [conversation_id, storage.settings.dedupe_ttl_seconds] + [v for pair in receivers for v in pair]
    return int(storage.script(_COUNT_SCRIPT)(keys=keys, args=args))


def count_unread_each(storage: Storage, counts: list[tuple[int, int, str, int]]) -> None:
    """`count_unread` for many messages, (receiver, msg id, conversation id, stream position) each,
    in one round trip."""
    script, pipe = storage.script(_COUNT_SCRIPT), storage.redis.pipeline(transaction=False)
    for user_id, msg_id, conversation_id, seq in counts:
        script(keys=[COUNTED_KEY.format(msg_id), UNREAD_KEY.format(user_id)],
               args=[conversation_id, storage.settings.dedupe_ttl_seconds, user_id, seq], client=pipe)
    if counts:
        pipe.execute()


def forget_unread(storage: Storage, user_ids) -> None:
    """Drop cached counters; each is rebuilt from MySQL when next asked for."""
    keys = [UNREAD_KEY.format(uid) for uid in user_ids]
    for i in range(0, len(keys), 1000):
        storage.redis.delete(*keys[i:i + 1000])


def unread_group_messages(user_id: int):
    """Query of the group messages the user has not read (see the module docstring)."""
    return (select(Message)
            .join(Conversation, (Conversation.user_id == user_id)
                  & (Conversation.conversation_id == Message.conversation_id) & Conversation.is_group.is_(True))
            .join(SyncEntry, (SyncEntry.user_id == user_id) & (SyncEntry.message_id == Message.id)
                  & (SyncEntry.kind == ENTRY_MESSAGE))
            .where(Message.id > func.coalesce(Conversation.last_read_msg_id, 0), Message.sender_id != user_id,
                   Message.status != STATUS_RECALLED))


def unread_private_messages(user_id: int):
    return select(Message).where(Message.receiver_id == user_id, Message.status == STATUS_UNREAD,
                                 Message.is_group.is_(False))


def latest_unread(session, user_id: int, limit: int, muted=()) -> list[Message]:
    """The user's newest unread messages, private and group, newest first (muted conversations left out)."""
    found = []
    for query in (unread_private_messages(user_id), unread_group_messages(user_id)):
        if muted:
            query = query.where(Message.conversation_id.not_in(list(muted)))
        found.extend(session.scalars(query.order_by(Message.id.desc()).limit(limit)).all())
    return sorted(found, key=lambda m: m.id, reverse=True)[:limit]


def latest_unread_ids(session, muted_by_user: dict[int, list[str]]) -> dict[int, int]:
    """`latest_unread(session, uid, 1, muted)` for many users in a few set-based queries: per user,
    the id of their newest unread message outside their muted conversations (users with none left out)."""
    users = list(muted_by_user)
    if not users:
        return {}
    plain = [uid for uid in users if not muted_by_user[uid]]
    muting = [uid for uid in users if muted_by_user[uid]]
    rows = []
    if plain:  # newest per user
        rows += [(uid, None, mid) for uid, mid in session.execute(
            select(Message.receiver_id, func.max(Message.id))
            .where(Message.receiver_id.in_(plain), Message.status == STATUS_UNREAD, Message.is_group.is_(False))
            .group_by(Message.receiver_id)).all()]
    if muting:  # newest per user and conversation: the muted ones are dropped below
        rows += session.execute(select(Message.receiver_id, Message.conversation_id, func.max(Message.id))
                                .where(Message.receiver_id.in_(muting), Message.status == STATUS_UNREAD,
                                       Message.is_group.is_(False))
                                .group_by(Message.receiver_id, Message.conversation_id)).all()
    rows += session.execute(
        select(Conversation.user_id, Message.conversation_id, func.max(Message.id))
        .select_from(Message)
        .join(Conversation, Conversation.user_id.in_(users) & (Conversation.conversation_id == Message.conversation_id)
              & Conversation.is_group.is_(True))
        .join(SyncEntry, (SyncEntry.user_id == Conversation.user_id) & (SyncEntry.message_id == Message.id)
              & (SyncEntry.kind == ENTRY_MESSAGE))
        .where(Message.id > func.coalesce(Conversation.last_read_msg_id, 0),
               Message.sender_id != Conversation.user_id, Message.status != STATUS_RECALLED)
        .group_by(Conversation.user_id, Message.conversation_id)).all()
    newest: dict[int, int] = {}
    muted = {uid: set(m) for uid, m in muted_by_user.items()}
    for user_id, conversation_id, msg_id in rows:
        if msg_id is not None and conversation_id not in muted[user_id] and msg_id > newest.get(user_id, 0):
            newest[user_id] = msg_id
    return newest


def is_unread_by(session, user_id: int, message: Message) -> bool:
    """Whether this user still has the message unread (it may have been read or recalled since)."""
    if message.status == STATUS_RECALLED:
        return False
    if not message.is_group:
        return message.receiver_id == user_id and message.status == STATUS_UNREAD
    read_upto = session.scalar(select(Conversation.last_read_msg_id).where(
        Conversation.user_id == user_id, Conversation.conversation_id == message.conversation_id))
    return (read_upto or 0) < message.id


def unread_states(session, wanted) -> dict[tuple[int, int], str | None]:
    """`is_unread_by` for many (user id, msg id) pairs in two queries: None while the
    message is unread by that user, else why not ("read", or "recalled").

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


def _counts_from_mysql(storage: Storage, user_id: int) -> tuple[int, dict[str, int]]:
    with storage.session() as session:  # one snapshot: the position and the counts agree
        seq = session.scalar(select(User.inbox_seq).where(User.id == user_id)) or 0
        counts = {}
        for query in (unread_private_messages(user_id), unread_group_messages(user_id)):
            inner = query.with_only_columns(Message.conversation_id, Message.id).subquery()
            counts.update(session.execute(
                select(inner.c.conversation_id, func.count()).group_by(inner.c.conversation_id)).all())
    return seq, counts


def rebuild_unread(storage: Storage, user_id: int) -> dict[str, int]:
    """Recount the user's unread messages from MySQL into Redis; returns the counts.

    Counts and `_seq` come from one snapshot. If the stream moved while we
    wrote, a dispatch may have skipped a message the snapshot missed: recount.
    Rebuilds of one user run one at a time, so an older snapshot (taken before
    a read committed) never lands after a newer one.
    """
    with _rebuild_lock(storage, user_id):
        return _rebuild(storage, user_id)


@contextmanager
def _rebuild_lock(storage: Storage, user_id: int, timeout: float = 10.0, hold: float = 30.0):
    key, token = LOCK_KEY.format(user_id), uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while not storage.redis.set(key, token, nx=True, px=int(hold * 1000)):
        if time.monotonic() > deadline:
            break  # a crashed holder: its lock expires; go ahead rather than hang
        time.sleep(0.01)
    try:
        yield
    finally:
        storage.script(_RELEASE_SCRIPT)(keys=[key], args=[token])


def _rebuild(storage: Storage, user_id: int) -> dict[str, int]:
    key = UNREAD_KEY.format(user_id)
    counts: dict[str, int] = {}
    for _ in range(MAX_REBUILD_ROUNDS):
        seq, counts = _counts_from_mysql(storage, user_id)
        pipe = storage.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={SEQ_FIELD: seq, **counts})
        pipe.execute()
        with storage.sessions() as session:
            if (session.scalar(select(User.inbox_seq).where(User.id == user_id)) or 0) == seq:
                break
    return counts


def unread_totals(storage: Storage, user_ids) -> dict[int, int]:
    """Each user's total unread (the push badge): one Redis round trip; a user whose counters
    Redis lost is recounted from MySQL (`rebuild_unread`)."""
    user_ids = list(user_ids)
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.hgetall(UNREAD_KEY.format(user_id))
    cached = dict(zip(user_ids, pipe.execute() if user_ids else []))
    lost = [user_id for user_id, raw in cached.items() if SEQ_FIELD not in raw]
    rebuilt = rebuild_unread_many(storage, lost) if lost else {}
    totals = {}
    for user_id, raw in cached.items():
        counts = rebuilt[user_id] if user_id in rebuilt else \
            {cid: int(n) for cid, n in raw.items() if cid != SEQ_FIELD}
        totals[user_id] = sum(n for n in counts.values() if n > 0)
    return totals


def rebuild_unread_many(storage: Storage, user_ids) -> dict[int, dict[str, int]]:
    """`rebuild_unread` for many users: their rebuild locks in one round trip, the counts of all
    from one MySQL snapshot in three queries, written in one pipeline. A user whose lock another
    rebuild holds, or whose stream moved meanwhile, is rebuilt on their own (`rebuild_unread`)."""
    user_ids = list(dict.fromkeys(user_ids))
    token, hold_ms = uuid.uuid4().hex, 30_000
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.set(LOCK_KEY.format(user_id), token, nx=True, px=hold_ms)
    locked = [uid for uid, got in zip(user_ids, pipe.execute()) if got]
    counts: dict[int, dict[str, int]] = {}
    try:
        if locked:
            seqs, counts = _counts_from_mysql_many(storage, locked)
            pipe = storage.redis.pipeline(transaction=True)
            for user_id in locked:
                pipe.delete(UNREAD_KEY.format(user_id))
                pipe.hset(UNREAD_KEY.format(user_id), mapping={SEQ_FIELD: seqs[user_id], **counts[user_id]})
            pipe.execute()
            with storage.sessions() as session:
                now = dict(session.execute(select(User.id, User.inbox_seq).where(User.id.in_(locked))).all())
            moved = [uid for uid in locked if (now.get(uid) or 0) != seqs[uid]]
        else:
            moved = []
    finally:
        release = storage.script(_RELEASE_SCRIPT)
        pipe = storage.redis.pipeline(transaction=False)
        for user_id in locked:
            release(keys=[LOCK_KEY.format(user_id)], args=[token], client=pipe)
        if locked:
            pipe.execute()
    for user_id in set(user_ids) - set(locked) | set(moved):
        counts[user_id] = rebuild_unread(storage, user_id)
    return counts


def _counts_from_mysql_many(storage: Storage, user_ids: list[int]) -> tuple[dict[int, int], dict[int, dict[str, int]]]:
    """`_counts_from_mysql` of many users, from one snapshot."""
    counts: dict[int, dict[str, int]] = {user_id: {} for user_id in user_ids}
    with storage.session() as session:
        seqs = dict(session.execute(select(User.id, User.inbox_seq).where(User.id.in_(user_ids))).all())
        private = (select(Message.receiver_id, Message.conversation_id, func.count())
                   .where(Message.receiver_id.in_(user_ids), Message.status == STATUS_UNREAD,
                          Message.is_group.is_(False))
                   .group_by(Message.receiver_id, Message.conversation_id))
        group = (select(Conversation.user_id, Message.conversation_id, func.count())
                 .select_from(Message)
                 .join(Conversation, Conversation.user_id.in_(user_ids)
                       & (Conversation.conversation_id == Message.conversation_id) & Conversation.is_group.is_(True))
                 .join(SyncEntry, (SyncEntry.user_id == Conversation.user_id) & (SyncEntry.message_id == Message.id)
                       & (SyncEntry.kind == ENTRY_MESSAGE))
                 .where(Message.id > func.coalesce(Conversation.last_read_msg_id, 0),
                        Message.sender_id != Conversation.user_id, Message.status != STATUS_RECALLED)
                 .group_by(Conversation.user_id, Message.conversation_id))
        for query in (private, group):
            for user_id, conversation_id, n in session.execute(query).all():
                counts[user_id][conversation_id] = n
    return {user_id: seqs.get(user_id) or 0 for user_id in user_ids}, counts


def unread_counts(storage: Storage, user_id: int) -> dict[str, int]:
    """Per-conversation unread counts (zeros left out), rebuilt on a Redis miss."""
    raw = storage.redis.hgetall(UNREAD_KEY.format(user_id))
    if SEQ_FIELD not in raw:
        return {cid: n for cid, n in rebuild_unread(storage, user_id).items() if n > 0}
    return {cid: int(n) for cid, n in raw.items() if cid != SEQ_FIELD and int(n) > 0}
