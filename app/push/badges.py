"""Badge sync and notification withdrawal: after a read (on any device) or a recall, the user's
devices that show a notification of ours get a silent push with the new badge and the
notifications to remove.

What each device shows is kept in Redis, `push:shown:{uid}` (a hash): field
`<device_id>:<conversation_id>` = the msg id of the notification the provider accepted for that
conversation (one per conversation: the collapse id replaces older ones), and
`<device_id>:#badge` = the badge it was last given. A device with no field shows nothing of ours
and is never sent a badge sync.

A read or recall opens a window of PUSH_BADGE_COALESCE_SECONDS per user (`push:badgesync:{uid}`,
SET NX, like push:coalesce); only the first event of a window queues the planner
(send_push with kind "badge_sync"), which looks at the state when the window closes: every shown
notification whose message is read or recalled by then is withdrawn, and the badge is the total
unread then. So a burst of reads costs one silent push per device per window.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import redis
from sqlalchemy import select

from app.chat.unread import unread_states, unread_totals
from app.push.planning import PENDING, PROVIDER_BY_PLATFORM, PushPlan, pending_rows, schedule_once
from app.push.providers import BADGE_SYNC
from app.push.settings import load_preferences
from app.storage import Storage
from models import Device

log = logging.getLogger(__name__)

SHOWN_KEY = "push:shown:{}"
BADGE_SYNC_KEY = "push:badgesync:{}"
BADGE_FIELD = "#badge"
PRIORITY_BADGE_SYNC = 3  # push_tasks: below chat pushes (8, 5), above digests (1)
SHOWN_TTL_SECONDS = 30 * 24 * 3600  # what a device shows is forgotten after a month without pushes
BADGE_TARGET = "badge:{}"  # push_log.target of a device's badge sync ("device:<id>" for notifications)

# After a badge sync was accepted: drop the withdrawn notifications that are still the ones shown
# (a newer push of the conversation may have replaced one meanwhile), then keep the badge if the
# device still shows something, or forget the device.
_WITHDRAWN = """
local prefix = ARGV[1] .. ':'
for i = 3, #ARGV, 2 do
  local f = prefix .. ARGV[i]
  if redis.call('HGET', KEYS[1], f) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], f) end
end
local left = false
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #prefix) == prefix and f ~= prefix .. '#badge' then left = true break end
end
if left then redis.call('HSET', KEYS[1], prefix .. '#badge', ARGV[2])
else redis.call('HDEL', KEYS[1], prefix .. '#badge') end
return left and 1 or 0
"""


def claim_badge_syncs(storage: Storage, user_ids) -> list[int]:
    """The users (of these, after a read or a recall) for whom a badge sync is to be queued now:
    those whose devices show a notification of ours, and who have no sync window open yet.

    One Redis round trip for users never pushed (the common case on a read), two otherwise.
    """
    user_ids = list(dict.fromkeys(int(u) for u in user_ids))
    if not user_ids:
        return []
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:
        pipe.exists(SHOWN_KEY.format(user_id))
    shown = [uid for uid, exists in zip(user_ids, pipe.execute()) if exists]
    window = storage.settings.push_badge_coalesce_seconds
    return [uid for uid in shown if schedule_once(storage, BADGE_SYNC_KEY.format(uid), window)]


def plan_badge_syncs(storage: Storage, wanted: dict[int, int]) -> list[PushPlan]:
    """For each user (user id -> the msg id of the read or recall that opened the window): one
    pending push_log row per device that shows a notification, with the new badge and the shown
    notifications whose message is now read or recalled.

    A device gets none when nothing it shows changed (nothing to withdraw, badge as it was), when
    its provider is not in the user's channels, or when it is gone (its entries are dropped).
    """
    user_ids = list(wanted)
    if not user_ids:
        return []
    pipe = storage.redis.pipeline(transaction=False)
    for user_id in user_ids:  # reads from now on open the next window
        pipe.delete(BADGE_SYNC_KEY.format(user_id))
    for user_id in user_ids:
        pipe.hgetall(SHOWN_KEY.format(user_id))
    hashes = pipe.execute()[len(user_ids):]
    shown: dict[int, dict[int, dict[str, str]]] = {}  # user -> device -> {conversation: msg id}
    last_badge: dict[tuple[int, int], int] = {}
    for user_id, fields in zip(user_ids, hashes):
        for field, value in (fields or {}).items():
            field, value = _text(field), _text(value)
            device, _, conversation = field.partition(":")
            if not device.isdigit() or not conversation:
                continue
            if conversation == BADGE_FIELD:
                last_badge[user_id, int(device)] = int(value) if value.lstrip("-").isdigit() else -1
            else:
                shown.setdefault(user_id, {}).setdefault(int(device), {})[conversation] = value
    plans = {user_id: PushPlan(user_id, priority=PRIORITY_BADGE_SYNC) for user_id in user_ids}
    if not shown:
        for plan in plans.values():
            plan.skipped = "no device shows a notification"
        return list(plans.values())
    with storage.sessions() as session:
        prefs = load_preferences(session, list(shown))
        devices = {d.id: d for d in session.execute(select(Device.id, Device.user_id, Device.platform)
                                                    .where(Device.user_id.in_(list(shown)))).all()}
        states = unread_states(session, {(uid, int(m)) for uid, per_device in shown.items()
                                         for convs in per_device.values() for m in convs.values() if m.isdigit()})
    badges = unread_totals(storage, list(shown))
    rows, gone = [], defaultdict(list)
    for user_id, per_device in shown.items():
        for device_id, convs in sorted(per_device.items()):
            device = devices.get(device_id)
            if device is None or device.user_id != user_id:
                gone[user_id].append(device_id)
                continue
            provider = PROVIDER_BY_PLATFORM.get(device.platform)
            withdraw = sorted([c, m] for c, m in convs.items()
                              if not m.isdigit() or states.get((user_id, int(m))) is not None)
            badge = badges[user_id]
            if provider not in prefs[user_id].channels or (not withdraw and last_badge.get((user_id, device_id))
                                                           == badge):
                continue
            payload = {"kind": BADGE_SYNC, "badge": badge, "withdraw": withdraw,
                       "msg_id": str(wanted[user_id]), "conversation_id": ""}
            rows.append(dict(user_id=user_id, message_id=int(wanted[user_id]), push_type=provider,
                             push_status=PENDING, target=BADGE_TARGET.format(device_id), device_id=device_id,
                             priority=PRIORITY_BADGE_SYNC, payload=payload))
    if gone:
        _forget_devices(storage, gone)
    ids = pending_rows(storage, rows)
    for row in rows:
        push_id = ids.get((row["message_id"], row["user_id"], row["target"]))
        if push_id is not None:
            plans[row["user_id"]].push_ids.append(push_id)
    for plan in plans.values():
        if not plan.push_ids:
            plan.skipped = "no device shows a notification that changed"
    return [plans[user_id] for user_id in user_ids]


def record_delivered(storage: Storage, delivered: list[tuple[int, int, dict]]) -> None:
    """After the outcomes committed: what each device shows now, from the pushes its provider
    accepted, as (user_id, device_id, payload). Best effort: Redis trouble is logged, and costs
    at most a badge sync that is not sent or sent once too often."""
    if not delivered:
        return
    pipe = storage.redis.pipeline(transaction=False)
    withdrawn = storage.redis.register_script(_WITHDRAWN)
    for user_id, device_id, payload in delivered:
        key = SHOWN_KEY.format(user_id)
        if payload.get("kind") == BADGE_SYNC:
            args = [str(device_id), str(payload.get("badge", 0))]
            for conversation, msg_id in payload.get("withdraw") or []:
                args += [conversation, str(msg_id)]
            withdrawn(keys=[key], args=args, client=pipe)
        else:
            pipe.hset(key, mapping={f"{device_id}:{payload['conversation_id']}": payload["msg_id"],
                                    f"{device_id}:{BADGE_FIELD}": payload.get("badge", 0)})
            pipe.expire(key, SHOWN_TTL_SECONDS)
    try:
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("shown notifications of %d push(es) not recorded: %s", len(delivered), exc)


def _forget_devices(storage: Storage, gone: dict[int, list[int]]) -> None:
    pipe = storage.redis.pipeline(transaction=False)
    fields = storage.redis.pipeline(transaction=False)
    for user_id in gone:
        fields.hkeys(SHOWN_KEY.format(user_id))
    for user_id, names in zip(gone, fields.execute()):
        prefixes = tuple(f"{d}:" for d in gone[user_id])
        stale = [n for n in map(_text, names) if n.startswith(prefixes)]
        if stale:
            pipe.hdel(SHOWN_KEY.format(user_id), *stale)
    pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
