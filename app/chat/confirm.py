"""The "recently active, now gone" window: a live message counts as delivered only once confirmed.

Dispatch hands a message to the recipient's open connections; a socket that
died silently (a phone in a tunnel, a closed laptop) still looks online until
its presence expires, so the message would be neither seen nor pushed. Each
recipient delivered live is remembered here with a deadline
(`LIVE_CONFIRM_SECONDS`); when it passes and none of the recipient's devices
confirmed holding the message (`received`) or read it, the message takes the
offline path: an offline-index row, and the caller schedules the user's push
(which, coalesced and planned as for any offline user, pushes the newest
unread message: nothing if another device read it meanwhile).

The pending entries are one Redis sorted set; one sweep task is queued per
window while entries wait (not one per message). A Redis loss forgets them:
those messages are then treated as delivered, as before this window existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, tuple_

from app.storage import Storage, insert_ignoring_duplicates
from models import STATUS_RECALLED, Conversation, Message, OfflineMessageIndex

PENDING_KEY = "confirm:pending"  # zset: "<user id>:<msg id>:<conversation id>:<push priority>" -> deadline ms
SWEEP_KEY = "confirm:sweep"  # set while a sweep is queued
SWEEP_BATCH = 2000


@dataclass
class SweepOutcome:
    unconfirmed: list[tuple[int, int, int]] = field(default_factory=list)  # (user id, msg id, push priority)
    confirmed: int = 0
    next_due_ms: int | None = None  # the earliest deadline still waiting


def await_confirmation(storage: Storage, items, now_ms: int) -> bool:
    """Remember (user id, msg id, conversation id, push priority) delivered live; True when the caller
    must queue a sweep (none is queued yet)."""
    window_ms = int(storage.settings.live_confirm_seconds * 1000)
    items = list(items)
    if not window_ms or not items:
        return False
    pipe = storage.redis.pipeline(transaction=False)
    pipe.zadd(PENDING_KEY, {f"{uid}:{mid}:{cid}:{priority}": now_ms + window_ms for uid, mid, cid, priority in items})
    # A lost sweep task is replaced once the flag expires: the next delivery queues another.
    pipe.set(SWEEP_KEY, now_ms, nx=True, px=window_ms * 3)
    return bool(pipe.execute()[1])


def settle_due(storage: Storage, now_ms: int, limit: int = SWEEP_BATCH) -> SweepOutcome:
    """The entries whose deadline passed: confirmed ones dropped, the others given an offline-index
    row and returned for their pushes. Safe to run twice (the index rows are unique)."""
    raw = storage.redis.zrangebyscore(PENDING_KEY, "-inf", now_ms, start=0, num=limit)
    outcome = SweepOutcome()
    due = []
    for member in raw:
        text = member.decode() if isinstance(member, bytes) else member
        try:
            uid, mid, cid, priority = text.split(":", 3)
            due.append((int(uid), int(mid), cid, int(priority), member))
        except ValueError:
            continue  # not ours: dropped below
    if due:
        pairs = {(uid, cid) for uid, _, cid, _, _ in due}
        with storage.sessions() as session:
            held = {(row.user_id, row.conversation_id): max(row.last_delivered_msg_id or 0, row.last_read_msg_id or 0)
                    for row in session.execute(select(
                        Conversation.user_id, Conversation.conversation_id, Conversation.last_delivered_msg_id,
                        Conversation.last_read_msg_id).where(
                        tuple_(Conversation.user_id, Conversation.conversation_id).in_(sorted(pairs))))}
            recalled = set(session.scalars(select(Message.id).where(
                Message.id.in_({mid for _, mid, _, _, _ in due}), Message.status == STATUS_RECALLED)))
        rows = []
        for uid, mid, cid, priority, _ in due:
            if held.get((uid, cid), 0) >= mid or mid in recalled:
                outcome.confirmed += 1
            else:
                outcome.unconfirmed.append((uid, mid, priority))
                rows.append({"user_id": uid, "message_id": mid, "conversation_id": cid})
        if rows:
            with storage.session() as session:
                session.execute(insert_ignoring_duplicates(OfflineMessageIndex, storage.is_mysql), rows)
    if raw:
        storage.redis.zrem(PENDING_KEY, *raw)  # after the rows: a sweep that dies is redone
    first = storage.redis.zrange(PENDING_KEY, 0, 0, withscores=True)
    outcome.next_due_ms = int(first[0][1]) if first else None
    return outcome


def rearm_sweep(storage: Storage, outcome: SweepOutcome, now_ms: int) -> float | None:
    """After a sweep: the countdown (s) of the next one if entries still wait, else None. The flag is
    dropped first, so a delivery that raced the sweep either sees it gone (and queues) or is seen here."""
    storage.redis.delete(SWEEP_KEY)
    if outcome.next_due_ms is None:
        first = storage.redis.zrange(PENDING_KEY, 0, 0, withscores=True)
        if not first:
            return None
        outcome.next_due_ms = int(first[0][1])
    window_ms = int(storage.settings.live_confirm_seconds * 1000) or 1000
    if not storage.redis.set(SWEEP_KEY, now_ms, nx=True, px=window_ms * 3):
        return None  # a delivery queued one meanwhile
    return max(0.0, (outcome.next_due_ms - now_ms) / 1000)
