"""Unread counters: `unread:{uid}` in Redis, rebuilt from MySQL.

MySQL is the truth: a private message is unread by its receiver while its
status is 0. The Redis hash caches the counts per conversation and carries
`_seq`, the user's sync-stream position the counts were taken at. Dispatch
counts a message only if its stream entry is newer than `_seq` (older ones
are in the rebuilt numbers already), and only once (`unread:counted:{msg}`).
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

from sqlalchemy import func, select

from app.storage import Storage
from models import STATUS_UNREAD, Message, User

UNREAD_KEY = "unread:{}"
LOCK_KEY = "unread:rebuilding:{}"
_RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
COUNTED_KEY = "unread:counted:{}"
SEQ_FIELD = "_seq"
MAX_REBUILD_ROUNDS = 5

# KEYS: unread hash, counted set. ARGV: user id, conversation id, entry seq, counted TTL.
_COUNT_SCRIPT = """
local built = redis.call('HGET', KEYS[1], '_seq')
if not built or tonumber(ARGV[3]) <= tonumber(built) then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
return 1
"""


def count_unread(storage: Storage, user_id: int, msg_id: int, conversation_id: str, entry_seq: int) -> bool:
    """Count one newly dispatched message for its receiver; harmless if repeated."""
    script = storage.script(_COUNT_SCRIPT)
    return bool(script(keys=[UNREAD_KEY.format(user_id), COUNTED_KEY.format(msg_id)],
                       args=[user_id, conversation_id, entry_seq, storage.settings.dedupe_ttl_seconds]))


def _counts_from_mysql(storage: Storage, user_id: int) -> tuple[int, dict[str, int]]:
    with storage.session() as session:
        seq = session.scalar(select(User.inbox_seq).where(User.id == user_id)) or 0
        rows = session.execute(
            select(Message.conversation_id, func.count()).where(
                Message.receiver_id == user_id, Message.status == STATUS_UNREAD, Message.is_group.is_(False),
            ).group_by(Message.conversation_id)).all()
    return seq, {cid: n for cid, n in rows}


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


def unread_counts(storage: Storage, user_id: int) -> dict[str, int]:
    """Per-conversation unread counts (zeros left out), rebuilt on a Redis miss."""
    raw = storage.redis.hgetall(UNREAD_KEY.format(user_id))
    if SEQ_FIELD not in raw:
        return {cid: n for cid, n in rebuild_unread(storage, user_id).items() if n > 0}
    return {cid: int(n) for cid, n in raw.items() if cid != SEQ_FIELD and int(n) > 0}
