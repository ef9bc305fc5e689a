"""Blocks: a user shuts another out of their private chats, their groups and their presence.

MySQL (`user_block`) is the source of truth. The send path asks Redis: `blocks:{uid}` is the
set of users `uid` blocked, with the member "-" once it holds every row of MySQL (a key
without "-" is incomplete: a block written while no full copy was loaded). A missing or
incomplete set is loaded from MySQL, so a Redis flush or eviction never lets a blocked
user's send through. A load only writes its copy if no unblock happened since it started
(`blocks:{uid}:gen`); a block writes Redis before and after its commit, so a concurrent
load can only miss it if Redis also lost the first write, and then the second one fills it.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import delete, select

from app.errors import Forbidden, InvalidInput, NotFound, Unavailable
from app.storage import Storage, insert_ignoring_duplicates
from models import User, UserBlock

log = logging.getLogger(__name__)

BLOCKS_KEY = "blocks:{}"
BLOCKS_GEN_KEY = "blocks:{}:gen"
LOADED = "-"
BLOCKS_CACHE_SECONDS = 3600
BLOCKED_SEND_MESSAGE = "you cannot message this user"

# KEYS: set, generation. ARGV: generation seen before the MySQL read, TTL, blocked ids...
_STORE_LOADED = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SADD', KEYS[1], '-', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: set, generation. ARGV: blocked id, TTL, "add" or "remove".
_CHANGE = """
if ARGV[3] == 'add' then redis.call('SADD', KEYS[1], ARGV[1]) else redis.call('SREM', KEYS[1], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2] * 2)
return 1
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _require_target(storage: Storage, user_id: int, target_id: int) -> None:
    if target_id == user_id:
        raise InvalidInput("you cannot block yourself")
    with storage.sessions() as session:
        user = session.get(User, target_id) if 0 < target_id < 2**63 else None
    if user is None:
        raise NotFound(f"user {target_id} does not exist")


def _change_cache(storage: Storage, user_id: int, target_id: int, op: str) -> None:
    storage.script(_CHANGE)(keys=[BLOCKS_KEY.format(user_id), BLOCKS_GEN_KEY.format(user_id)],
                            args=[target_id, BLOCKS_CACHE_SECONDS, op])


def block_user(storage: Storage, user_id: int, target_id: int) -> None:
    """`user_id` blocks `target_id` (idempotent). Redis first: if it is down, nothing changed (503)."""
    _require_target(storage, user_id, target_id)
    try:
        _change_cache(storage, user_id, target_id, "add")
    except Exception as exc:
        log.warning("user %s: block not stored, Redis unavailable: %s", user_id, exc.__class__.__name__)
        raise Unavailable("the block could not be stored right now; retry") from None
    with storage.session() as session:
        session.execute(insert_ignoring_duplicates(UserBlock, storage.is_mysql).values(
            blocker_id=user_id, blocked_id=target_id, created_at_ms=_now_ms()))
    try:  # a load that read MySQL before the commit, after a flush that took the first write
        _change_cache(storage, user_id, target_id, "add")
    except Exception as exc:
        log.warning("user %s: block stored, cache not refreshed: %s", user_id, exc.__class__.__name__)
    log.info("user %s blocked user %s", user_id, target_id)


def unblock_user(storage: Storage, user_id: int, target_id: int) -> None:
    """Lift a block (idempotent). If Redis cannot be told, the block holds until its copy expires."""
    _require_target(storage, user_id, target_id)
    with storage.session() as session:
        session.execute(delete(UserBlock).where(UserBlock.blocker_id == user_id, UserBlock.blocked_id == target_id))
    try:
        _change_cache(storage, user_id, target_id, "remove")
    except Exception as exc:
        log.warning("user %s: unblock stored, cache not updated (holds up to %d s): %s", user_id,
                    BLOCKS_CACHE_SECONDS, exc.__class__.__name__)
    log.info("user %s unblocked user %s", user_id, target_id)


def list_blocks(storage: Storage, user_id: int) -> list[dict]:
    """The users `user_id` blocked, newest first: {"user_id", "username", "blocked_at"}."""
    with storage.sessions() as session:
        rows = session.execute(select(UserBlock.blocked_id, User.username, UserBlock.created_at_ms)
                               .outerjoin(User, User.id == UserBlock.blocked_id)
                               .where(UserBlock.blocker_id == user_id)
                               .order_by(UserBlock.created_at_ms.desc(), UserBlock.blocked_id)).all()
    return [{"user_id": str(uid), "username": name, "blocked_at": at} for uid, name, at in rows]


def blocked_by_sql(session, blocker_id: int, user_ids) -> set[int]:
    """Which of `user_ids` `blocker_id` blocked, from MySQL (inside the caller's transaction)."""
    ids = list(set(user_ids))
    if not ids:
        return set()
    return set(session.scalars(select(UserBlock.blocked_id).where(
        UserBlock.blocker_id == blocker_id, UserBlock.blocked_id.in_(ids))).all())


def blockers_among(session, user_ids, blocked_id: int) -> set[int]:
    """Which of `user_ids` blocked `blocked_id`, from MySQL."""
    ids = list(set(user_ids))
    if not ids:
        return set()
    return set(session.scalars(select(UserBlock.blocker_id).where(
        UserBlock.blocked_id == blocked_id, UserBlock.blocker_id.in_(ids))).all())


def blocks_lookup(pipe, blocker_id: int, user_id: int) -> None:
    """Queue the Redis half of "did `blocker_id` block `user_id`?" on a pipeline (the send path
    asks it in its dedupe round trip); its answer goes to `has_blocked(..., cached=)`."""
    pipe.smismember(BLOCKS_KEY.format(blocker_id), [str(user_id), LOADED])


def has_blocked(storage: Storage, blocker_id: int, user_id: int, cached: list | None = None) -> bool:
    """Whether `blocker_id` blocked `user_id`: one Redis round trip (none with `cached`, the answer
    of `blocks_lookup`), MySQL when Redis does not hold the whole list (then the list is loaded
    for the next ask)."""
    key = BLOCKS_KEY.format(blocker_id)
    blocked, loaded = cached if cached is not None else storage.redis.smismember(key, [str(user_id), LOADED])
    if blocked:
        return True
    if loaded:
        return False
    generation = storage.redis.get(BLOCKS_GEN_KEY.format(blocker_id)) or "0"
    with storage.sessions() as session:
        ids = session.scalars(select(UserBlock.blocked_id).where(UserBlock.blocker_id == blocker_id)).all()
    storage.script(_STORE_LOADED)(keys=[key, BLOCKS_GEN_KEY.format(blocker_id)],
                                  args=[generation, BLOCKS_CACHE_SECONDS, *[str(i) for i in ids]])
    return user_id in set(ids)


def require_not_blocked(storage: Storage, recipient_id: int, sender_id: int, cached: list | None = None) -> None:
    """The send-path check of a private message: Forbidden if the recipient blocked the sender.
    Never answers "allowed" because a store is down: Unavailable then."""
    try:
        blocked = has_blocked(storage, recipient_id, sender_id, cached)
    except Exception as exc:
        log.warning("send by user %s refused, block list unavailable: %s", sender_id, exc.__class__.__name__)
        raise Unavailable("message not accepted (block list unavailable); retry with the same client_msg_id") \
            from None
    if blocked:
        raise Forbidden(BLOCKED_SEND_MESSAGE)
