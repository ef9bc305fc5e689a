"""Delivery attempts of push_log rows: one transaction per batch (rows locked, the provider
calls, outcomes recorded), the retry delay of a temporary failure, and digest mails composed
when they go out. Who gets what is app.push.planning."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from sqlalchemy import Boolean, bindparam, case, delete, func, select, update
from sqlalchemy.exc import DBAPIError

from app import metrics
from app.chat.conversations import message_preview
from app.chat.unread import latest_unread, unread_states
from app.push.planning import (
    DIGEST_MAX_MESSAGES, FAILED, PENDING, PREVIEW_CHARS, PRIORITY_PRIVATE, SKIPPED, SUCCESS,
)
from app.push.badges import record_delivered
from app.push.providers import (
    BADGE_SYNC, DeadToken, Delivered, PushOutcome, PushProvider, PushRequest, TemporaryFailure,
)
from app.push.settings import load_preferences
from app.storage import Storage
from models import ChatGroup, Device, PushLog, User, USER_DISPLAY_NAME

log = logging.getLogger(__name__)

MISSING = "missing"  # a delivery of a push_log row that does not exist


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
    subscription: dict | None = None  # webpush: the device's endpoint and keys
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


def attempt_pushes(storage: Storage, pushes: Iterable[tuple[int, int | None]], providers: dict[str, PushProvider],
                   max_retries: int,
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
    # What the devices show now: the badge syncs of app.push.badges go only where something is shown.
    record_delivered(storage, [(a.user_id, a.device_id, a.payload) for a in written
                               if a.status == SUCCESS and a.device_id is not None and a.push_type != "email"])
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


def _settle_unsendable(session, todo: list[_Attempt], providers: dict[str, PushProvider]) -> None:
    """Settle what needs no provider call: read or recalled meanwhile, device gone, provider not configured."""
    device_ids = {a.device_id for a in todo if a.device_id is not None}
    devices = {d.id: d for d in session.execute(select(Device.id, Device.user_id, Device.token, Device.subscription)
                                                .where(Device.id.in_(device_ids))).all()} if device_ids else {}
    # A badge sync is about messages read or recalled: it goes out whatever their state.
    states = unread_states(session, {(a.user_id, a.message_id) for a in todo
                                     if a.push_type != "email" and a.payload.get("kind") != BADGE_SYNC})
    for a in todo:
        if a.push_type == "email":
            if providers.get("email") is None:
                a.settle(FAILED, "email is not configured on this server")
            continue
        why = states.get((a.user_id, a.message_id))
        device = devices.get(a.device_id)
        if why is not None:  # no attempt: the count stays
            a.attempts -= 1
            a.settle(SKIPPED, f"message {why} before the push went out")
        elif device is None or device.user_id != a.user_id:
            a.settle(FAILED, "device removed before the push was sent")
        elif providers.get(a.push_type) is None:
            a.settle(FAILED, f"{a.push_type} is not configured on this server")
        else:
            a.token, a.subscription = device.token, device.subscription


def _send(storage: Storage, todo: list[_Attempt], providers: dict[str, PushProvider]
          ) -> list[tuple[_Attempt, PushOutcome]]:
    """The provider calls, the most urgent first: (attempt, outcome) for each attempt that was sent."""
    by_provider: dict[str, list[tuple[_Attempt, PushRequest]]] = {}
    for a in sorted(todo, key=lambda a: -a.priority):
        request = _request(storage, a)
        if request is not None:
            by_provider.setdefault(a.push_type, []).append((a, request))
    sent = []
    for push_type, batch in by_provider.items():
        started = time.monotonic()
        # Concurrent where the provider can (APNs: streams of one connection; FCM: threads).
        outcomes = providers[push_type].send_many([request for _, request in batch])
        took = (time.monotonic() - started) * 1000
        for (a, _), outcome in zip(batch, outcomes):
            log.info("push %s (msg %s, %s): %s after %.0f ms%s%s", a.push_id, a.payload["msg_id"], push_type,
                     type(outcome).__name__, took, f" (one of {len(batch)} at once)" if len(batch) > 1 else "",
                     f", id {outcome.provider_id}" if isinstance(outcome, Delivered) and outcome.provider_id else "")
            sent.append((a, outcome))
    return sent


def _request(storage: Storage, a: _Attempt) -> PushRequest | None:
    """What to send for this attempt: the stored payload for a device, the digest composed now for
    an email; None (and the attempt settled) when a digest has nothing left to say."""
    if a.push_type == "email":
        digest = _digest_mail(storage, a.user_id, a.payload["msg_id"], a.priority)
        if isinstance(digest, str):
            a.settle(SKIPPED, digest)
            return None
        return digest
    if a.payload.get("kind") == BADGE_SYNC:
        return PushRequest(token=a.token, title="", body="", badge=a.payload["badge"], conversation_id="",
                           msg_id=a.payload["msg_id"], priority=a.priority, sound="", kind=BADGE_SYNC,
                           withdraw=tuple((str(c), str(m)) for c, m in a.payload.get("withdraw") or []),
                           subscription=a.subscription)
    return PushRequest(token=a.token, title=a.payload["title"], body=a.payload["body"], badge=a.payload["badge"],
                       conversation_id=a.payload["conversation_id"], msg_id=a.payload["msg_id"],
                       priority=a.priority, preview=a.payload.get("preview", True), subscription=a.subscription)


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


def _digest_mail(storage: Storage, user_id: int, msg_id: str, priority: int) -> PushRequest | str:
    """The digest mail of what the user has not read yet, or why there is none to send."""
    with storage.sessions() as session:
        prefs = load_preferences(session, [user_id])[user_id]
        messages = latest_unread(session, user_id, DIGEST_MAX_MESSAGES, prefs.muted_conversations)
        names = dict(session.execute(select(User.id, USER_DISPLAY_NAME).where(
            User.id.in_({m.sender_id for m in messages}))).all()) if messages else {}
        groups = dict(session.execute(select(ChatGroup.id, ChatGroup.name).where(
            ChatGroup.id.in_({m.group_id for m in messages if m.is_group}))).all()) if messages else {}
    # "alice" for a private message, "alice in Ops" for a group one.
    unread = [(m, names.get(m.sender_id, "someone") + (f" in {groups.get(m.group_id)}" if m.is_group else ""))
              for m in messages]
    if not prefs.digest_address or "email" not in prefs.channels:
        return "email is no longer enabled (or its address is not verified)"
    if not unread:
        return "everything was read before the digest went out"
    count = len(unread)
    lines = [f"You have {count} unread message{'s' if count != 1 else ''} on NetherLink:", ""]
    for msg, name in unread[:20]:
        text = message_preview(msg.message_type, msg.content, PREVIEW_CHARS)
        lines.append(f"- {name}: {text}" if prefs.preview else f"- a message from {name}")
    return PushRequest(token=prefs.digest_address, title=f"{count} unread message{'s' if count != 1 else ''} on NetherLink",
                       body="\n".join(lines), badge=count, conversation_id="", msg_id=msg_id, priority=priority)
