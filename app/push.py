"""Push bookkeeping. Talking to APNs / FCM / SMTP is a later step (issue #4):
for now `send_push` records one pending push_log row per target."""
from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.storage import Storage
from models import Device, PushLog, PushSetting

log = logging.getLogger(__name__)

# push_tasks priorities (x-max-priority 10): higher is consumed first.
PRIORITY_PRIVATE, PRIORITY_GROUP, PRIORITY_DIGEST = 8, 5, 1
PROVIDER_BY_PLATFORM = {"ios": "apns", "android": "fcm", "web": "fcm"}


def record_pending_pushes(storage: Storage, msg_id: int, user_id: int, priority: int) -> int:
    """One pending push_log row per device (or email); returns how many are new."""
    with storage.sessions() as session:
        devices = session.scalars(select(Device).where(Device.user_id == user_id)).all()
        setting = session.get(PushSetting, user_id)
    targets = [(PROVIDER_BY_PLATFORM.get(d.platform, "fcm"), f"device:{d.id}", d.id) for d in devices]
    if setting and setting.email and "email" in (setting.channels or []):
        targets.append(("email", "email", None))
    created = 0
    for push_type, target, device_id in targets:
        try:
            with storage.session() as session:
                session.add(PushLog(user_id=user_id, message_id=msg_id, push_type=push_type, push_status="pending",
                                    target=target, device_id=device_id, priority=priority))
            created += 1
        except IntegrityError:
            pass  # redelivered task: the row exists
    if not targets:
        log.info("msg %s: user %s has no push target", msg_id, user_id)
    return created
