"""Offline push: which devices get what, one attempt at a time, and digests.

dispatch -> `schedule_push` (coalescing) -> send_push task -> `plan_pushes`
(one push_log row per device, carrying the newest unread message and the
badge) -> deliver_push task per row; the push worker takes those tasks in
batches -> `attempt_pushes` (one transaction per batch: rows locked, the
provider calls, outcomes recorded). Email goes as a digest after a quiet
delay.

push_tasks priorities (x-max-priority 10, higher first): private 8, group 5,
email digest 1.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from sqlalchemy import Boolean, bindparam, case, delete, func, select, update
from sqlalchemy.exc import DBAPIError

from app import metrics
from app.chat.conversations import message_preview
from app.push.providers import DeadToken, Delivered, PushRequest, TemporaryFailure
from app.push.settings import load_preferences, load_preferences_many
from app.storage import Storage, insert_ignoring_duplicates
from app.chat.unread import latest_unread, latest_unread_ids, unread_states, unread_totals
from models import ChatGroup, Device, Message, PushLog, User

log = logging.getLogger(__name__)

PRIORITY_PRIVATE, PRIORITY_GROUP, PRIORITY_DIGEST = 8, 5, 1
PROVIDER_BY_PLATFORM = {"ios": "apns", "android": "fcm", "web": "fcm"}
COALESCE_KEY = "push:coalesce:{}"
DIGEST_KEY = "push:digest:{}"
GENERIC_BODY = "New message"
DIGEST_MAX_MESSAGES = 200
PREVIEW_CHARS = 180

PENDING, SUCCESS, FAILED, SKIPPED = "pending", "success", "failed", "skipped"
MISSING = "missing"  # a delivery of a push_log row that does not exist


def schedule_once(storage: Storage, key: str, window: float) -> bool:
    """True for the first caller in a window: many messages, one scheduled push.

    The key reads "pending" until the caller marks it "queued" (mark_queued),
    so a redelivered caller that died in between can tell and schedule again.
    """
    return bool(storage.redis.set(key, "pending", nx=True, px=max(1, int(window * 1000)) + 1000))


def mark_queued(storage: Storage, key: str) -> None:
    storage.redis.set(key, "queued", xx=True, keepttl=True)


@dataclass
class PushPlan:
    user_id: int
    push_ids: list[int] = field(default_factory=list)
    digest: bool = False
    skipped: str | None = None  # why nothing is pushed
    priority: int = PRIORITY_PRIVATE


def plan_pushes(storage: Storage, user_id: int, now: datetime | None = None) -> PushPlan:
    """Push the user's newest unread message to each enabled device, once (`plan_pushes_many` of one)."""
    return plan_pushes_many(storage, [user_id], now)[0]


def plan_pushes_many(storage: Storage, user_ids, now: datetime | None = None) -> list[PushPlan]:
    """For each user: push their newest unread message to each enabled device, once.

    Runs after a user's coalescing window: whatever arrived meanwhile is
    covered by this one push (newest message, badge = total unread). One plan
    per distinct user, in order. The users' settings, newest unread messages,
    devices, senders and groups are read in a few set-based queries, the
    badges in one Redis round trip, and the push_log rows written in one
    transaction.
    """
    now = now or datetime.now(timezone.utc)
    user_ids = list(dict.fromkeys(int(uid) for uid in user_ids))
    if not user_ids:
        return []
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:  # later messages schedule a new push
        pipe.delete(COALESCE_KEY.format(user_id))
    pipe.execute()
    plans = {user_id: PushPlan(user_id) for user_id in user_ids}
    with storage.sessions() as session:
        prefs = load_preferences_many(session, user_ids)
        newest = latest_unread_ids(session, {uid: prefs[uid].muted_conversations for uid in user_ids})
        messages = {m.id: m for m in session.scalars(select(Message).where(Message.id.in_(set(newest.values()))))} \
            if newest else {}
        devices: dict[int, list] = {}
        for device in session.execute(select(Device.id, Device.user_id, Device.platform)
                                      .where(Device.user_id.in_(user_ids)).order_by(Device.id)).all():
            devices.setdefault(device.user_id, []).append(device)
        senders = dict(session.execute(select(User.id, User.username).where(
            User.id.in_({m.sender_id for m in messages.values()}))).all()) if messages else {}
        group_ids = {m.group_id for m in messages.values() if m.is_group}
        groups = dict(session.execute(select(ChatGroup.id, ChatGroup.name).where(
            ChatGroup.id.in_(group_ids))).all()) if group_ids else {}
    to_push = []
    for user_id, plan in plans.items():
        p, latest = prefs[user_id], messages.get(newest.get(user_id))
        plan.digest = bool(p.email and "email" in p.channels)
        if latest is None:
            plan.skipped = "nothing unread outside muted conversations (read elsewhere, recalled or muted)"
        elif p.is_quiet(now):
            plan.skipped = "do-not-disturb hours"
        else:
            to_push.append((plan, p, latest))
    badges = unread_totals(storage, [plan.user_id for plan, _, _ in to_push])
    rows = []
    for plan, p, latest in to_push:
        # A coalesced push goes at the priority of what it shows, not of what opened the window.
        plan.priority = PRIORITY_GROUP if latest.is_group else PRIORITY_PRIVATE
        sender = senders.get(latest.sender_id)
        body, title = message_preview(latest.message_type, latest.content, PREVIEW_CHARS), sender
        if latest.is_group and latest.group_id in groups:  # a group push: the group's name, and who wrote
            title, body = groups[latest.group_id], f"{sender}: {body}"
        payload = {"title": title if p.preview else "NetherLink", "body": body if p.preview else GENERIC_BODY,
                   "badge": badges[plan.user_id], "conversation_id": latest.conversation_id,
                   "msg_id": str(latest.id), "preview": p.preview}
        for device in devices.get(plan.user_id, []):
            provider = PROVIDER_BY_PLATFORM.get(device.platform)
            if provider in p.channels:
                rows.append((plan, dict(user_id=plan.user_id, message_id=latest.id, push_type=provider,
                                        push_status=PENDING, target=f"device:{device.id}", device_id=device.id,
                                        priority=plan.priority, payload=payload)))
    ids = _pending_rows(storage, [row for _, row in rows])
    for plan, row in rows:
        push_id = ids.get((row["message_id"], row["user_id"], row["target"]))
        if push_id is not None:
            plan.push_ids.append(push_id)
    return [plans[user_id] for user_id in user_ids]


def _pending_rows(storage: Storage, rows: list[dict]) -> dict[tuple[int, int, str], int]:
    """Create these pending push_log rows (a row that exists is kept as it is); the ids of those
    to deliver now: new, or left pending untried by a planner run that died (a redelivered send_push).
    A row that was already tried, or failed, has its own course and is left out."""
    if not rows:
        return {}
    with storage.session() as session:
        session.execute(insert_ignoring_duplicates(PushLog, storage.is_mysql), rows)
        found = session.execute(select(PushLog.id, PushLog.message_id, PushLog.user_id, PushLog.target,
                                       PushLog.push_status, PushLog.attempts)
                                .where(PushLog.user_id.in_({r["user_id"] for r in rows}),
                                       PushLog.message_id.in_({r["message_id"] for r in rows}))).all()
    wanted = {(r["message_id"], r["user_id"], r["target"]) for r in rows}
    return {(f.message_id, f.user_id, f.target): f.id for f in found
            if (f.message_id, f.user_id, f.target) in wanted and f.push_status == PENDING and f.attempts == 0}


def _pending_row(storage, user_id, msg_id, push_type, target, device_id, priority, payload) -> int | None:
    """The new push_log row for this target and message; None if it exists and was tried."""
    return _pending_rows(storage, [dict(user_id=user_id, message_id=msg_id, push_type=push_type,
                                        push_status=PENDING, target=target, device_id=device_id,
                                        priority=priority, payload=payload)]).get((msg_id, user_id, target))


@dataclass(frozen=True)
class AttemptResult:
    push_id: int
    status: str  # the row's status after this run (MISSING: there is no such row)
    retry_in: float | None = None  # seconds until the next attempt, for a temporary failure
    priority: int = PRIORITY_PRIVATE
    attempts: int = 0  # the row's attempts after this run: the attempt a retry is queued for
    stale: bool = False  # nothing was done: the row is not pending, or not at the attempt asked for


def backoff_seconds(attempt: int, base: float, retry_after: float | None,
                    jitter: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter (50-150 %), never sooner than Retry-After."""
    delay = base * (2 ** (attempt - 1)) * (0.5 + jitter())
    return max(delay, retry_after or 0.0)


def attempt_push(storage: Storage, push_id: int, providers: dict, max_retries: int, base_delay: float,
                 jitter: Callable[[], float] = random.random) -> AttemptResult:
    """One delivery attempt of one pending push_log row; records the outcome (`attempt_pushes` of one)."""
    result = attempt_pushes(storage, [(push_id, None)], providers, max_retries, base_delay, jitter)[push_id]
    if result.status == MISSING:
        raise LookupError(f"push {push_id} does not exist")
    return result


@dataclass
class _Attempt:
    """One row of a batch on its way: what to send, then what to write."""

    push_id: int
    user_id: int
    message_id: int
    push_type: str
    priority: int
    attempts: int  # the row's count after this attempt
    payload: dict
    device_id: int | None
    token: str | None = None
    status: str | None = None  # None until settled
    error: str | None = None
    provider_id: str | None = None
    retry_in: float | None = None
    dead: bool = False  # the device's token is dead: delete the device
    attempts_before: int = 0  # the row's count when it was locked

    def __post_init__(self) -> None:
        self.attempts_before = self.attempts - 1

    def settle(self, status: str, error: str | None = None, provider_id: str | None = None) -> None:
        self.status, self.error, self.provider_id = status, error, provider_id


_ROW_COLUMNS = (PushLog.id, PushLog.user_id, PushLog.message_id, PushLog.push_type, PushLog.push_status,
                PushLog.device_id, PushLog.priority, PushLog.attempts, PushLog.payload)


def attempt_pushes(storage: Storage, pushes: Iterable[tuple[int, int | None]], providers: dict, max_retries: int,
                   base_delay: float, jitter: Callable[[], float] = random.random,
                   before_commit: Callable[[dict[int, AttemptResult]], None] | None = None
                   ) -> dict[int, AttemptResult]:
    """One delivery attempt of each pending push_log row named; a result per push id.

    `pushes` are (push_id, attempt) pairs: `attempt` is the row's `attempts`
    when the delivery was queued (0 for a new row or an admin retry, n for the
    retry after the n-th attempt), or None for "whatever it is now". A row is
    attempted only while it is `pending` at that attempt; anything else (done
    meanwhile, or a second copy of a delivery that already ran) is left as it
    is and reported `stale`. So a delivery that runs twice sends nothing twice.

    One transaction: the rows are locked (`SELECT ... FOR UPDATE`, in id
    order, so concurrent batches queue behind each other instead of sending
    the same row twice), their devices, messages and read state read in three
    set-based queries, the notifications sent (APNs ones concurrently, as
    streams of one HTTP/2 connection; FCM ones 8 at a time; digest mails one
    after the other), all outcomes written (one executemany UPDATE by primary
    key) and dead devices deleted.
    `before_commit(results of the attempted rows)` runs before the commit,
    with the locks still held: the caller queues the retries there, so a crash
    never leaves a row waiting for a retry nobody queued (the transaction
    rolls back to before the attempt and the redelivered task attempts it
    again; a retry queued meanwhile then finds it at another attempt and does
    nothing). On SQLite, which has no row locks, reading and writing are two
    transactions.
    """
    wanted: dict[int, set] = {}
    for push_id, attempt in pushes:
        wanted.setdefault(int(push_id), set()).add(attempt)
    results = {push_id: AttemptResult(push_id, MISSING, stale=True) for push_id in wanted}
    if not wanted:
        return results
    todo: list[_Attempt] = []
    with storage.sessions() as session:
        try:
            for row in _lock_rows(session, wanted):
                asked = wanted[row.id]
                if row.push_status != PENDING or (None not in asked and row.attempts not in asked):
                    results[row.id] = AttemptResult(row.id, row.push_status, priority=row.priority,
                                                    attempts=row.attempts, stale=True)
                else:
                    todo.append(_Attempt(row.id, row.user_id, row.message_id, row.push_type, row.priority,
                                         row.attempts + 1, dict(row.payload or {}), row.device_id))
            _settle_unsendable(session, todo, providers)
            if not storage.is_mysql:
                session.commit()  # SQLite: no snapshot held across the sends (concurrent writers would conflict)
            for attempt, outcome in _send(storage, [a for a in todo if a.status is None], providers):
                _apply(attempt, outcome, max_retries, base_delay, jitter)
            written = _commit_outcomes(session, todo, before_commit)
        except BaseException:
            session.rollback()
            raise
    for a in todo:  # sent, but changed by someone else before a deadlocked write could be redone: not ours
        results[a.push_id] = AttemptResult(a.push_id, a.status, priority=a.priority, attempts=a.attempts, stale=True)
    for a in written:  # committed
        results[a.push_id] = AttemptResult(a.push_id, a.status, a.retry_in, a.priority, a.attempts)
        metrics.push_outcome(a.push_type, a.status)
    return results


def _lock_rows(session, push_ids) -> list:
    """The rows, locked, in id order. Each by its primary key: on a small table the optimizer may
    prefer a scan for `id IN (...)`, and a locking scan locks every row it passes (other batches'
    rows too: deadlocks)."""
    return session.execute(select(*_ROW_COLUMNS).with_hint(PushLog, "FORCE INDEX (PRIMARY)", "mysql")
                           .where(PushLog.id.in_(sorted(push_ids))).order_by(PushLog.id).with_for_update()).all()


LOCK_CONFLICTS = (1205, 1213)  # MySQL/MariaDB: lock wait timeout, deadlock


def _commit_outcomes(session, todo: list[_Attempt], before_commit) -> list[_Attempt]:
    """Write the outcomes, let the caller queue the retries, commit; the attempts written.

    The notifications are out by now: if the database picks this transaction as a deadlock victim
    (which rolls it back and drops its locks), the rows are locked again and the outcomes written
    once more, for the rows nobody else has changed meanwhile, rather than letting a retry of the
    whole batch send them again.
    """
    for round_ in range(3):
        try:
            if round_:
                current = {r.id: (r.push_status, r.attempts) for r in _lock_rows(session, [a.push_id for a in todo])}
                todo = [a for a in todo if current.get(a.push_id) == (PENDING, a.attempts_before)]
            _write(session, todo)
            if before_commit is not None and todo:
                before_commit({a.push_id: AttemptResult(a.push_id, a.status, a.retry_in, a.priority, a.attempts)
                               for a in todo})
            session.commit()
            return todo
        except DBAPIError as exc:
            session.rollback()
            code = exc.orig.args[0] if getattr(exc, "orig", None) is not None and exc.orig.args else None
            if code not in LOCK_CONFLICTS or round_ == 2:
                raise
            log.warning("push outcomes of %d row(s): %s; writing them again", len(todo), exc.orig)
    return todo


def _settle_unsendable(session, todo: list[_Attempt], providers: dict) -> None:
    """Settle what needs no provider call: read or recalled meanwhile, device gone, provider not configured."""
    device_ids = {a.device_id for a in todo if a.device_id is not None}
    devices = {d.id: d for d in session.execute(select(Device.id, Device.user_id, Device.token)
                                                .where(Device.id.in_(device_ids))).all()} if device_ids else {}
    states = unread_states(session, {(a.user_id, a.message_id) for a in todo if a.push_type != "email"})
    for a in todo:
        if a.push_type == "email":
            if providers.get("email") is None:
                a.settle(FAILED, "email is not configured on this server")
            continue
        why = states[a.user_id, a.message_id]
        device = devices.get(a.device_id)
        if why is not None:  # no attempt: the count stays
            a.attempts -= 1
            a.settle(SKIPPED, f"message {why} before the push went out")
        elif device is None or device.user_id != a.user_id:
            a.settle(FAILED, "device removed before the push was sent")
        elif providers.get(a.push_type) is None:
            a.settle(FAILED, f"{a.push_type} is not configured on this server")
        else:
            a.token = device.token


def _send(storage: Storage, todo: list[_Attempt], providers: dict) -> list[tuple[_Attempt, object]]:
    """The provider calls: (attempt, outcome) for each attempt that was sent."""
    by_provider: dict[str, list[_Attempt]] = {}
    for a in sorted(todo, key=lambda a: -a.priority):  # the most urgent first
        by_provider.setdefault(a.push_type, []).append(a)
    sent = []
    for push_type, attempts in by_provider.items():
        provider, started = providers[push_type], time.monotonic()
        if push_type == "email":  # digests: one mail at a time
            for a in attempts:
                outcome, skipped = _mail_digest(storage, a.user_id, provider)
                if skipped:
                    a.settle(SKIPPED, skipped)
                else:
                    sent.append((a, outcome))
            continue
        pushes = [(PushRequest(token=a.token, title=a.payload["title"], body=a.payload["body"],
                               badge=a.payload["badge"], conversation_id=a.payload["conversation_id"],
                               msg_id=a.payload["msg_id"], priority=a.priority), a.payload.get("preview", True))
                  for a in attempts]
        if hasattr(provider, "send_many"):  # concurrent requests (APNs: streams of one connection; FCM: threads)
            outcomes = provider.send_many(pushes)
        else:
            outcomes = [provider.send(request, preview=preview) for request, preview in pushes]
        took = (time.monotonic() - started) * 1000
        for a, outcome in zip(attempts, outcomes):
            log.info("push %s (msg %s, %s): %s after %.0f ms%s%s", a.push_id, a.payload["msg_id"], push_type,
                     type(outcome).__name__, took, f" (one of {len(attempts)} at once)" if len(attempts) > 1 else "",
                     f", id {outcome.provider_id}" if isinstance(outcome, Delivered) and outcome.provider_id else "")
            sent.append((a, outcome))
    return sent


def _apply(a: _Attempt, outcome, max_retries: int, base_delay: float, jitter: Callable[[], float]) -> None:
    """Turn a provider outcome into the row's new state (and a retry delay)."""
    if isinstance(outcome, Delivered):
        a.settle(SUCCESS, None, outcome.provider_id)
    elif isinstance(outcome, DeadToken) and a.token is not None:  # removed at once and never retried
        a.dead = True
        a.settle(FAILED, f"dead token removed: {outcome.reason}")
    elif isinstance(outcome, TemporaryFailure) and a.attempts <= max_retries:
        a.retry_in = backoff_seconds(a.attempts, base_delay, outcome.retry_after, jitter)
        a.settle(PENDING, f"retrying in {a.retry_in:.1f}s: {outcome.reason}")
    elif isinstance(outcome, TemporaryFailure):
        a.settle(FAILED, f"gave up after {a.attempts} attempts: {outcome.reason}")
    else:
        a.settle(FAILED, outcome.reason)


def _write(session, todo: list[_Attempt]) -> None:
    """All outcomes in one executemany UPDATE by primary key; dead devices likewise deleted.

    (One statement per row, in one round trip per row but one transaction: a multi-row UPDATE
    ... WHERE id IN (...) may be run as a locking scan of the whole table, as the SELECT above.)
    """
    if not todo:
        return
    table = PushLog.__table__
    session.execute(update(table).where(table.c.id == bindparam("b_id")).values(
        attempts=bindparam("b_attempts"), push_status=bindparam("b_status"), error_msg=bindparam("b_error"),
        provider_id=func.coalesce(bindparam("b_provider_id"), table.c.provider_id),
        push_time=case((bindparam("b_delivered", type_=Boolean), func.now()), else_=table.c.push_time),
    ), [dict(b_id=a.push_id, b_attempts=a.attempts, b_status=a.status, b_error=a.error,
             b_provider_id=a.provider_id if a.status == SUCCESS else None, b_delivered=a.status == SUCCESS)
        for a in todo])
    dead = {(a.device_id, a.token) for a in todo if a.dead}
    if dead:
        device = Device.__table__
        session.execute(delete(device).where(device.c.id == bindparam("b_id"), device.c.token == bindparam("b_token")),
                        [dict(b_id=device_id, b_token=token) for device_id, token in dead])


@dataclass(frozen=True)
class DigestPlan:
    push_id: int | None = None  # the email row to deliver now
    defer_seconds: float | None = None  # do-not-disturb hours: plan again when they end


def plan_digest(storage: Storage, user_id: int, now: datetime | None = None) -> DigestPlan:
    """A pending email row for the user's unread messages, or nothing to mail, or later (quiet hours)."""
    now = now or datetime.now(timezone.utc)
    with storage.sessions() as session:
        prefs = load_preferences(session, user_id)
        latest = next(iter(latest_unread(session, user_id, 1, prefs.muted_conversations)), None)
    quiet_until = prefs.quiet_until(now)
    if quiet_until is not None and latest is not None:  # the digest key stays: no second digest meanwhile
        return DigestPlan(defer_seconds=(quiet_until - now).total_seconds())
    storage.redis.delete(DIGEST_KEY.format(user_id))  # later messages schedule a new digest
    if not prefs.email or "email" not in prefs.channels or latest is None:
        return DigestPlan()
    return DigestPlan(_pending_row(storage, user_id, latest.id, "email", "email", None, PRIORITY_DIGEST,
                                   {"msg_id": str(latest.id)}))


def _mail_digest(storage: Storage, user_id: int, email_client):
    """Compose and send the digest of what the user has not read yet."""
    with storage.sessions() as session:
        prefs = load_preferences(session, user_id)
        messages = latest_unread(session, user_id, DIGEST_MAX_MESSAGES, prefs.muted_conversations)
        names = dict(session.execute(select(User.id, User.username).where(
            User.id.in_({m.sender_id for m in messages}))).all()) if messages else {}
        groups = dict(session.execute(select(ChatGroup.id, ChatGroup.name).where(
            ChatGroup.id.in_({m.group_id for m in messages if m.is_group}))).all()) if messages else {}
    # "alice" for a private message, "alice in Ops" for a group one.
    unread = [(m, names.get(m.sender_id, "someone") + (f" in {groups.get(m.group_id)}" if m.is_group else ""))
              for m in messages]
    if not prefs.email or "email" not in prefs.channels:
        return None, "email is no longer enabled"
    if not unread:
        return None, "everything was read before the digest went out"
    count = len(unread)
    lines = [f"You have {count} unread message{'s' if count != 1 else ''} on NetherLink:", ""]
    for msg, name in unread[:20]:
        text = message_preview(msg.message_type, msg.content, PREVIEW_CHARS)
        lines.append(f"- {name}: {text}" if prefs.preview else f"- a message from {name}")
    return email_client.send(prefs.email, f"{count} unread message{'s' if count != 1 else ''} on NetherLink",
                             "\n".join(lines)), None
