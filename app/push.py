"""Offline push: which devices get what, one attempt at a time, and digests.

dispatch -> `schedule_push` (coalescing) -> send_push task -> `plan_pushes`
(one push_log row per device, carrying the newest unread message and the
badge) -> deliver_push task per row -> `attempt_push` (one provider call,
outcome recorded). Email goes as a digest after a quiet delay.

push_tasks priorities (x-max-priority 10, higher first): private 8, group 5,
email digest 1.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app import metrics
from app.messaging import message_preview
from app.providers import DeadToken, Delivered, PushRequest, TemporaryFailure
from app.push_settings import load_preferences
from app.storage import Storage
from app.unread import is_unread_by, latest_unread, unread_counts
from models import STATUS_RECALLED, ChatGroup, Device, Message, PushLog, User

log = logging.getLogger(__name__)

PRIORITY_PRIVATE, PRIORITY_GROUP, PRIORITY_DIGEST = 8, 5, 1
PROVIDER_BY_PLATFORM = {"ios": "apns", "android": "fcm", "web": "fcm"}
COALESCE_KEY = "push:coalesce:{}"
DIGEST_KEY = "push:digest:{}"
GENERIC_BODY = "New message"
DIGEST_MAX_MESSAGES = 200
PREVIEW_CHARS = 180

PENDING, SUCCESS, FAILED, SKIPPED = "pending", "success", "failed", "skipped"


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
    """Push the user's newest unread message to each enabled device, once.

    Runs after the coalescing window: whatever arrived meanwhile is covered by
    this one push (newest message, badge = total unread).
    """
    now = now or datetime.now(timezone.utc)
    storage.redis.delete(COALESCE_KEY.format(user_id))  # later messages schedule a new push
    plan = PushPlan(user_id)
    with storage.sessions() as session:
        prefs = load_preferences(session, user_id)
        latest = next(iter(latest_unread(session, user_id, 1, prefs.muted_conversations)), None)
        devices = session.scalars(select(Device).where(Device.user_id == user_id)).all()
        sender = session.get(User, latest.sender_id).username if latest else None
        group = session.get(ChatGroup, latest.group_id) if latest is not None and latest.is_group else None
    plan.digest = bool(prefs.email and "email" in prefs.channels)
    if latest is None:
        plan.skipped = "nothing unread outside muted conversations (read elsewhere, recalled or muted)"
        return plan
    if prefs.is_quiet(now):
        plan.skipped = "do-not-disturb hours"
        return plan
    # A coalesced push goes at the priority of what it shows, not of what opened the window.
    priority = plan.priority = PRIORITY_GROUP if latest.is_group else PRIORITY_PRIVATE
    badge = sum(unread_counts(storage, user_id).values())
    body = message_preview(latest.message_type, latest.content, PREVIEW_CHARS)
    title = sender
    if group is not None:  # a group push: the group's name, and who wrote
        title, body = group.name, f"{sender}: {body}"
    payload = {"title": title if prefs.preview else "NetherLink", "body": body if prefs.preview else GENERIC_BODY,
               "badge": badge, "conversation_id": latest.conversation_id, "msg_id": str(latest.id),
               "preview": prefs.preview}
    for device in devices:
        provider = PROVIDER_BY_PLATFORM.get(device.platform)
        if provider not in prefs.channels:
            continue
        push_id = _pending_row(storage, user_id, latest.id, provider, f"device:{device.id}", device.id, priority,
                               payload)
        if push_id is not None:
            plan.push_ids.append(push_id)
    return plan


def _pending_row(storage, user_id, msg_id, push_type, target, device_id, priority, payload) -> int | None:
    """The new push_log row for this target and message; None if it exists and was tried."""
    try:
        with storage.session() as session:
            row = PushLog(user_id=user_id, message_id=msg_id, push_type=push_type, push_status=PENDING,
                          target=target, device_id=device_id, priority=priority, payload=payload)
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError:  # a redelivered send_push: reuse the row
        with storage.sessions() as session:
            row = session.scalar(select(PushLog).where(PushLog.message_id == msg_id, PushLog.user_id == user_id,
                                                       PushLog.target == target))
        # Only a row no delivery has touched yet: one in backoff or failed has its own course.
        return row.id if row is not None and row.push_status == PENDING and row.attempts == 0 else None


@dataclass(frozen=True)
class AttemptResult:
    push_id: int
    status: str
    retry_in: float | None = None  # seconds until the next attempt, for a temporary failure
    priority: int = PRIORITY_PRIVATE


def backoff_seconds(attempt: int, base: float, retry_after: float | None,
                    jitter: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter (50-150 %), never sooner than Retry-After."""
    delay = base * (2 ** (attempt - 1)) * (0.5 + jitter())
    return max(delay, retry_after or 0.0)


def attempt_push(storage: Storage, push_id: int, providers: dict, max_retries: int, base_delay: float,
                 jitter: Callable[[], float] = random.random) -> AttemptResult:
    """One delivery attempt of one push_log row; records the outcome."""
    with storage.session() as session:
        row = session.get(PushLog, push_id, with_for_update=True)
        if row is None:
            raise LookupError(f"push {push_id} does not exist")
        if row.push_status == SUCCESS:
            return AttemptResult(push_id, SUCCESS)  # redelivered task: already done
        device = session.get(Device, row.device_id) if row.device_id else None
        payload = dict(row.payload or {})
        push_type, attempts, user_id = row.push_type, row.attempts + 1, row.user_id
        message = session.get(Message, row.message_id)
        unread = message is not None and is_unread_by(session, user_id, message)
    if push_type != "email" and not unread:
        why = "recalled" if message is not None and message.status == STATUS_RECALLED else "read"
        return _finish(storage, push_id, attempts - 1, SKIPPED, f"message {why} before the push went out")
    if push_type == "email":
        if providers.get("email") is None:
            return _finish(storage, push_id, attempts, FAILED, "email is not configured on this server")
        outcome, skipped = _mail_digest(storage, user_id, providers["email"])
        if skipped:
            return _finish(storage, push_id, attempts, SKIPPED, skipped)
        return _record(storage, push_id, attempts, outcome, None, max_retries, base_delay, jitter)
    if device is None or device.user_id != row.user_id:
        return _finish(storage, push_id, attempts, FAILED, "device removed before the push was sent")
    provider = providers.get(push_type)
    if provider is None:
        return _finish(storage, push_id, attempts, FAILED, f"{push_type} is not configured on this server")
    request = PushRequest(token=device.token, title=payload["title"], body=payload["body"], badge=payload["badge"],
                          conversation_id=payload["conversation_id"], msg_id=payload["msg_id"],
                          priority=row.priority)
    started = time.monotonic()
    outcome = provider.send(request, preview=payload.get("preview", True))
    log.info("push %s (msg %s, %s): %s after %.0f ms", push_id, payload["msg_id"], push_type,
             type(outcome).__name__, (time.monotonic() - started) * 1000)
    return _record(storage, push_id, attempts, outcome, device, max_retries, base_delay, jitter)


def _record(storage, push_id, attempts, outcome, device, max_retries, base_delay, jitter) -> AttemptResult:
    """Turn a provider outcome into the row's new state (and a retry delay)."""
    if isinstance(outcome, Delivered):
        return _finish(storage, push_id, attempts, SUCCESS, None, provider_id=outcome.provider_id)
    if isinstance(outcome, DeadToken) and device is not None:
        with storage.session() as session:  # a dead token is removed at once and never retried
            session.query(Device).filter(Device.id == device.id, Device.token == device.token).delete()
        return _finish(storage, push_id, attempts, FAILED, f"dead token removed: {outcome.reason}")
    if isinstance(outcome, TemporaryFailure) and attempts <= max_retries:
        retry_in = backoff_seconds(attempts, base_delay, outcome.retry_after, jitter)
        priority = _finish(storage, push_id, attempts, PENDING, f"retrying in {retry_in:.1f}s: {outcome.reason}").priority
        return AttemptResult(push_id, PENDING, retry_in, priority)
    if isinstance(outcome, TemporaryFailure):
        return _finish(storage, push_id, attempts, FAILED, f"gave up after {attempts} attempts: {outcome.reason}")
    return _finish(storage, push_id, attempts, FAILED, outcome.reason)


def _finish(storage, push_id, attempts, status, error, provider_id=None) -> AttemptResult:
    with storage.session() as session:
        row = session.get(PushLog, push_id)
        row.attempts, row.push_status, row.error_msg = attempts, status, error
        if status == SUCCESS:
            row.push_time, row.provider_id = func.now(), provider_id
        priority = row.priority
    metrics.push_outcome(row.push_type, status)  # committed (expire_on_commit is off)
    return AttemptResult(push_id, status, priority=priority)


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
