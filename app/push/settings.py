"""Devices (push tokens) and each user's push preferences. The REST bodies that change them are
checked in app.http.requests."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from models import Device, PushSetting

PLATFORMS = ("ios", "android", "web", "webpush")
CHANNELS = ("apns", "fcm", "email", "webpush")


# --- devices -------------------------------------------------------------------

def register_device(session: Session, user_id: int, platform: str, token: str,
                    subscription: dict | None = None) -> Device:
    """Add a push token; a token already registered (another account on the same
    phone) moves to this user. A webpush device also stores its subscription
    (endpoint and keys; its token is derived from the endpoint)."""
    device = session.scalar(select(Device).where(Device.token == token).with_for_update())
    if device is None:
        device = Device(user_id=user_id, platform=platform, token=token, subscription=subscription)
        session.add(device)
    else:  # a browser that subscribes again may have new keys for the same endpoint
        device.user_id, device.platform, device.subscription = user_id, platform, subscription
    session.flush()
    return device


def remove_device(session: Session, user_id: int, token: str) -> None:
    device = session.scalar(select(Device).where(Device.token == token, Device.user_id == user_id))
    if device is None:  # someone else's token is "not found" too: tokens are not to be probed
        raise NotFound("no such device token on your account")
    session.delete(device)


def list_devices(session: Session, user_id: int) -> list[Device]:
    """The user's devices, oldest first."""
    return list(session.scalars(select(Device).where(Device.user_id == user_id).order_by(Device.id)))


def device_view(device: Device) -> dict:
    return {"device_id": str(device.id), "platform": device.platform, "token": device.token}


# --- preferences ---------------------------------------------------------------

@dataclass
class PushPreferences:
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    email: str | None = None
    muted_conversations: list[str] = field(default_factory=list)
    dnd_start: str | None = None  # "HH:MM" in time_zone; quiet hours may wrap midnight
    dnd_end: str | None = None
    time_zone: str = "UTC"
    preview: bool = True
    email_verified: bool = False  # its owner confirmed the code mailed to it (app.push.email_verification)

    @property
    def digest_address(self) -> str | None:
        """Where digests may go: the address once verified, else nowhere."""
        return self.email if self.email_verified else None

    def view(self) -> dict:
        return {"channels": self.channels, "email": self.email, "email_verified": self.email_verified,
                "muted_conversations": self.muted_conversations,
                "do_not_disturb": {"start": self.dnd_start, "end": self.dnd_end} if self.dnd_start else None,
                "time_zone": self.time_zone, "preview": self.preview}

    def is_muted(self, conversation_id: str) -> bool:
        return conversation_id in self.muted_conversations

    def is_quiet(self, at: datetime) -> bool:
        """Whether `at` (aware) falls in the user's do-not-disturb hours, in their time zone."""
        if not self.dnd_start or not self.dnd_end:
            return False
        local = at.astimezone(ZoneInfo(self.time_zone)).time()
        start, end = _hhmm(self.dnd_start), _hhmm(self.dnd_end)
        if start <= end:
            return start <= local < end
        return local >= start or local < end  # e.g. 22:00-07:00

    def quiet_until(self, at: datetime) -> datetime | None:
        """When the do-not-disturb hours around `at` end (aware), or None if `at` is not in them."""
        if not self.is_quiet(at):
            return None
        local = at.astimezone(ZoneInfo(self.time_zone))
        end = _hhmm(self.dnd_end)
        until = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
        return until if until > local else until + timedelta(days=1)


def _hhmm(value: str) -> dtime:
    hours, minutes = value.split(":")
    return dtime(int(hours), int(minutes))


def load_preferences(session: Session, user_ids) -> dict[int, PushPreferences]:
    """The push preferences of these users (defaults for those who set none), in one query."""
    rows = {row.user_id: row for row in session.scalars(select(PushSetting).where(
        PushSetting.user_id.in_(list(user_ids))))} if user_ids else {}
    return {user_id: _preferences(rows.get(user_id)) for user_id in user_ids}


def _preferences(row: PushSetting | None) -> PushPreferences:
    if row is None:
        return PushPreferences()
    return PushPreferences(channels=list(row.channels or []), email=row.email,
                           muted_conversations=list(row.muted_conversations or []), dnd_start=row.dnd_start,
                           dnd_end=row.dnd_end, time_zone=row.time_zone or "UTC", preview=row.preview,
                           email_verified=row.email is not None and row.email_verified_at is not None)


def save_preferences(session: Session, user_id: int, prefs: PushPreferences) -> None:
    """Store the user's preferences (all of them: app.http.requests.PushSettingsUpdate merges a change)."""
    row = session.get(PushSetting, user_id) or PushSetting(user_id=user_id)
    if row.email != prefs.email:  # another address (or none) is not verified, whatever the old one was
        row.email_verified_at = row.email_code_hash = row.email_code_expires_at = None
        row.email_code_attempts = 0
    row.channels, row.email, row.muted_conversations = prefs.channels, prefs.email, prefs.muted_conversations
    row.dnd_start, row.dnd_end, row.time_zone, row.preview = prefs.dnd_start, prefs.dnd_end, prefs.time_zone, prefs.preview
    session.merge(row)
