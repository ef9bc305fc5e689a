"""Offline push, who gets what: the pushes of a user after their coalescing window, and digests.

dispatch -> `schedule_push` (coalescing) -> send_push task -> `plan_pushes`
(one push_log row per device, carrying the newest unread message and the
badge) -> app.push.attempts.attempt_pushes (one transaction per batch: rows
locked, the provider calls, outcomes recorded); retries are deliver_push
tasks. Email goes as a digest after a quiet delay (`plan_digest`).

push_tasks priorities (x-max-priority 10, higher first): private 8, group 5,
email digest 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select

from app.chat.conversations import message_preview
from app.media.uploads import push_text
from app.chat.unread import latest_unread, latest_unread_ids, latest_unread_mentions, unread_totals
from app.push.settings import load_preferences
from app.storage import Storage, insert_ignoring_duplicates
from models import ChatGroup, Device, Message, PushLog, User, USER_DISPLAY_NAME

PRIORITY_PRIVATE, PRIORITY_GROUP, PRIORITY_DIGEST = 8, 5, 1
PROVIDER_BY_PLATFORM = {"ios": "apns", "android": "fcm", "web": "fcm", "webpush": "webpush"}
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


def plan_pushes(storage: Storage, user_ids, now: datetime | None = None) -> list[PushPlan]:
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
        prefs = load_preferences(session, user_ids)
        newest = latest_unread_ids(session, {uid: prefs[uid].muted_conversations for uid in user_ids})
        for user_id, msg_id in latest_unread_mentions(
                session, {uid: prefs[uid].muted_conversations for uid in user_ids}).items():
            newest[user_id] = max(newest.get(user_id, 0), msg_id)  # a mention overrides the mute
        messages = {m.id: m for m in session.scalars(select(Message).where(Message.id.in_(set(newest.values()))))} \
            if newest else {}
        devices: dict[int, list] = {}
        for device in session.execute(select(Device.id, Device.user_id, Device.platform)
                                      .where(Device.user_id.in_(user_ids)).order_by(Device.id)).all():
            devices.setdefault(device.user_id, []).append(device)
        senders = dict(session.execute(select(User.id, USER_DISPLAY_NAME).where(
            User.id.in_({m.sender_id for m in messages.values()}))).all()) if messages else {}
        group_ids = {m.group_id for m in messages.values() if m.is_group}
        groups = dict(session.execute(select(ChatGroup.id, ChatGroup.name).where(
            ChatGroup.id.in_(group_ids))).all()) if group_ids else {}
    to_push = []
    for user_id, plan in plans.items():
        p, latest = prefs[user_id], messages.get(newest.get(user_id))
        plan.digest = bool(p.digest_address and "email" in p.channels)  # unverified: no digest
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
        body = push_text(storage, latest.message_type, latest.extra) \
            or message_preview(latest.message_type, latest.content, PREVIEW_CHARS)
        title = sender
        if latest.is_group and latest.group_id in groups:  # a group push: the group's name, and who wrote
            said = " mentioned you" if str(plan.user_id) in (latest.mentions or []) else ""
            title, body = groups[latest.group_id], f"{sender}{said}: {body}"
        payload = {"title": title if p.preview else "NetherLink", "body": body if p.preview else GENERIC_BODY,
                   "badge": badges[plan.user_id], "conversation_id": latest.conversation_id,
                   "msg_id": str(latest.id), "preview": p.preview}
        for device in devices.get(plan.user_id, []):
            provider = PROVIDER_BY_PLATFORM.get(device.platform)
            if provider in p.channels:
                rows.append((plan, dict(user_id=plan.user_id, message_id=latest.id, push_type=provider,
                                        push_status=PENDING, target=f"device:{device.id}", device_id=device.id,
                                        priority=plan.priority, payload=payload)))
    ids = pending_rows(storage, [row for _, row in rows])
    for plan, row in rows:
        push_id = ids.get((row["message_id"], row["user_id"], row["target"]))
        if push_id is not None:
            plan.push_ids.append(push_id)
    return [plans[user_id] for user_id in user_ids]


def refresh_unsent_payloads(storage: Storage, msg_id: int) -> int:
    """After an edit: the message's pushes planned but not sent yet (pending) show its new text;
    a sent one cannot change. Returns how many were rewritten."""
    with storage.session() as session:
        msg = session.get(Message, msg_id)
        rows = session.scalars(select(PushLog).where(
            PushLog.message_id == msg_id, PushLog.push_status == PENDING).with_for_update()).all() if msg else []
        rows = [r for r in rows if r.push_status == PENDING and r.payload and r.payload.get("preview")
                and "body" in r.payload and not r.payload.get("kind")]  # badge syncs and hidden previews keep theirs
        if not rows:
            return 0
        body = push_text(storage, msg.message_type, msg.extra) \
            or message_preview(msg.message_type, msg.content, PREVIEW_CHARS)
        if msg.is_group:  # as planned: the author, then the text
            body = f"{session.scalar(select(USER_DISPLAY_NAME).where(User.id == msg.sender_id))}: {body}"
        for row in rows:
            row.payload = {**row.payload, "body": body}  # a new object: the JSON column sees the change
    return len(rows)


def pending_rows(storage: Storage, rows: list[dict]) -> dict[tuple[int, int, str], int]:
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


@dataclass(frozen=True)
class DigestPlan:
    push_id: int | None = None  # the email row to deliver now
    defer_seconds: float | None = None  # do-not-disturb hours: plan again when they end


def plan_digest(storage: Storage, user_id: int, now: datetime | None = None) -> DigestPlan:
    """A pending email row for the user's unread messages, or nothing to mail, or later (quiet hours)."""
    now = now or datetime.now(timezone.utc)
    with storage.sessions() as session:
        prefs = load_preferences(session, [user_id])[user_id]
        latest = next(iter(latest_unread(session, user_id, 1, prefs.muted_conversations)), None)
    quiet_until = prefs.quiet_until(now)
    if quiet_until is not None and latest is not None:  # the digest key stays: no second digest meanwhile
        return DigestPlan(defer_seconds=(quiet_until - now).total_seconds())
    storage.redis.delete(DIGEST_KEY.format(user_id))  # later messages schedule a new digest
    if not prefs.digest_address or "email" not in prefs.channels or latest is None:
        return DigestPlan()
    row = dict(user_id=user_id, message_id=latest.id, push_type="email", push_status=PENDING, target="email",
               device_id=None, priority=PRIORITY_DIGEST, payload={"msg_id": str(latest.id)})
    return DigestPlan(pending_rows(storage, [row]).get((latest.id, user_id, "email")))
