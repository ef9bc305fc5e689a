"""Devices (push tokens) and each user's push preferences."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NotFound
from models import Device, PushSetting

PLATFORMS = ("ios", "android", "web")
CHANNELS = ("apns", "fcm", "email")
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,60}")
HHMM_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
CONVERSATION_ID_RE = re.compile(r"[a-z]_[0-9_]{1,98}")
MAX_MUTED = 1000


# --- devices -------------------------------------------------------------------

def register_device(session: Session, user_id: int, platform, token) -> Device:
    """Add a push token; a token already registered (another account on the same
    phone) moves to this user."""
    if platform not in PLATFORMS:
        raise InvalidInput(f"'platform' must be one of {', '.join(PLATFORMS)}")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise InvalidInput("'token' must be 1-255 printable ASCII characters without spaces")
    device = session.scalar(select(Device).where(Device.token == token).with_for_update())
    if device is None:
        device = Device(user_id=user_id, platform=platform, token=token)
        session.add(device)
    else:
        device.user_id, device.platform = user_id, platform
    session.flush()
    return device


def remove_device(session: Session, user_id: int, token: str) -> None:
    device = session.scalar(select(Device).where(Device.token == token, Device.user_id == user_id))
    if device is None:  # someone else's token is "not found" too: tokens are not to be probed
        raise NotFound("no such device token on your account")
    session.delete(device)


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

    def view(self) -> dict:
        return {"channels": self.channels, "email": self.email, "muted_conversations": self.muted_conversations,
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


def load_preferences(session: Session, user_id: int) -> PushPreferences:
    return _preferences(session.get(PushSetting, user_id))


def load_preferences_many(session: Session, user_ids) -> dict[int, PushPreferences]:
    """`load_preferences` of many users in one query."""
    rows = {row.user_id: row for row in session.scalars(select(PushSetting).where(
        PushSetting.user_id.in_(list(user_ids))))} if user_ids else {}
    return {user_id: _preferences(rows.get(user_id)) for user_id in user_ids}


def _preferences(row: PushSetting | None) -> PushPreferences:
    if row is None:
        return PushPreferences()
    return PushPreferences(channels=list(row.channels or []), email=row.email,
                           muted_conversations=list(row.muted_conversations or []), dnd_start=row.dnd_start,
                           dnd_end=row.dnd_end, time_zone=row.time_zone or "UTC", preview=row.preview)


def update_preferences(session: Session, user_id: int, body: dict) -> PushPreferences:
    """Apply the fields present in `body`; the others keep their values."""
    known = {"channels", "email", "muted_conversations", "do_not_disturb", "time_zone", "preview"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    prefs = load_preferences(session, user_id)
    if "channels" in body:
        channels = body["channels"]
        if not isinstance(channels, list) or any(c not in CHANNELS for c in channels):
            raise InvalidInput(f"'channels' must be a list of {', '.join(CHANNELS)}")
        prefs.channels = sorted(set(channels), key=CHANNELS.index)
    if "email" in body:
        email = body["email"]
        if email is not None and (not isinstance(email, str) or not EMAIL_RE.fullmatch(email)):
            raise InvalidInput("'email' must be an email address or null")
        prefs.email = email
    if "muted_conversations" in body:
        muted = body["muted_conversations"]
        if not isinstance(muted, list) or len(muted) > MAX_MUTED or any(
                not isinstance(c, str) or not CONVERSATION_ID_RE.fullmatch(c) for c in muted):
            raise InvalidInput(f"'muted_conversations' must be a list of at most {MAX_MUTED} conversation ids")
        prefs.muted_conversations = sorted(set(muted))
    if "do_not_disturb" in body:
        dnd = body["do_not_disturb"]
        if dnd is None:
            prefs.dnd_start = prefs.dnd_end = None
        elif isinstance(dnd, dict) and set(dnd) == {"start", "end"} and all(
                isinstance(dnd[k], str) and HHMM_RE.fullmatch(dnd[k]) for k in ("start", "end")) \
                and dnd["start"] != dnd["end"]:
            prefs.dnd_start, prefs.dnd_end = dnd["start"], dnd["end"]
        else:
            raise InvalidInput("'do_not_disturb' must be null or {\"start\": \"HH:MM\", \"end\": \"HH:MM\"} "
                               "(24-hour, different times; it may wrap midnight)")
    if "time_zone" in body:
        zone = body["time_zone"]
        try:
            if not isinstance(zone, str) or not zone:
                raise ValueError
            ZoneInfo(zone)
        except (ValueError, ZoneInfoNotFoundError):
            raise InvalidInput("'time_zone' must be an IANA time zone name such as 'Europe/Berlin'") from None
        prefs.time_zone = zone
    if "preview" in body:
        if not isinstance(body["preview"], bool):
            raise InvalidInput("'preview' must be true or false")
        prefs.preview = body["preview"]
    row = session.get(PushSetting, user_id) or PushSetting(user_id=user_id)
    row.channels, row.email, row.muted_conversations = prefs.channels, prefs.email, prefs.muted_conversations
    row.dnd_start, row.dnd_end, row.time_zone, row.preview = prefs.dnd_start, prefs.dnd_end, prefs.time_zone, prefs.preview
    session.merge(row)
    return prefs
