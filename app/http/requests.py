"""REST request bodies, parsed at the boundary into typed requests.

Each request is a frozen dataclass with a `parse(body)` classmethod that
returns it or raises InvalidInput (one 400) naming the field and what it must
be; views hand the parsed object's values to the domain, never a raw body.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.errors import InvalidInput
from app.push.admin import PushFilter
from app.push.settings import CHANNELS, PLATFORMS, PushPreferences

DEVICE_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,60}")
HHMM_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
CONVERSATION_ID_RE = re.compile(r"[a-z]_[0-9_]{1,98}")
MAX_MUTED = 1000


def _refuse_unknown(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _is_text(value, pattern: re.Pattern) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


@dataclass(frozen=True)
class DeviceRegistration:
    """POST /api/devices: a push token of this user's device."""

    platform: str
    token: str

    @classmethod
    def parse(cls, body: dict) -> DeviceRegistration:
        platform, token = body.get("platform"), body.get("token")
        if platform not in PLATFORMS:
            raise InvalidInput(f"'platform' must be one of {', '.join(PLATFORMS)}")
        if not _is_text(token, DEVICE_TOKEN_RE):
            raise InvalidInput("'token' must be 1-255 printable ASCII characters without spaces")
        return cls(platform, token)


@dataclass(frozen=True)
class PushSettingsUpdate:
    """PUT /api/push-settings: the preferences the body names, checked; the others keep their values.

    The fields are those of app.push.settings.PushPreferences; `given` names the
    ones the body sets (null is a value too: no email, no do-not-disturb hours).
    """

    given: frozenset[str]
    channels: list[str] | None = None
    email: str | None = None
    muted_conversations: list[str] | None = None
    dnd_start: str | None = None
    dnd_end: str | None = None
    time_zone: str | None = None
    preview: bool | None = None

    FIELDS = frozenset({"channels", "email", "muted_conversations", "do_not_disturb", "time_zone", "preview"})

    @classmethod
    def parse(cls, body: dict) -> PushSettingsUpdate:
        _refuse_unknown(body, cls.FIELDS)
        values: dict = {}
        if "channels" in body:
            channels = body["channels"]
            if not isinstance(channels, list) or any(c not in CHANNELS for c in channels):
                raise InvalidInput(f"'channels' must be a list of {', '.join(CHANNELS)}")
            values["channels"] = sorted(set(channels), key=CHANNELS.index)
        if "email" in body:
            if body["email"] is not None and not _is_text(body["email"], EMAIL_RE):
                raise InvalidInput("'email' must be an email address or null")
            values["email"] = body["email"]
        if "muted_conversations" in body:
            muted = body["muted_conversations"]
            if not isinstance(muted, list) or len(muted) > MAX_MUTED or any(
                    not _is_text(c, CONVERSATION_ID_RE) for c in muted):
                raise InvalidInput(f"'muted_conversations' must be a list of at most {MAX_MUTED} conversation ids")
            values["muted_conversations"] = sorted(set(muted))
        if "do_not_disturb" in body:
            values["dnd_start"], values["dnd_end"] = _quiet_hours(body["do_not_disturb"])
        if "time_zone" in body:
            values["time_zone"] = _time_zone(body["time_zone"])
        if "preview" in body:
            if not isinstance(body["preview"], bool):
                raise InvalidInput("'preview' must be true or false")
            values["preview"] = body["preview"]
        return cls(frozenset(values), **values)

    def applied_to(self, prefs: PushPreferences) -> PushPreferences:
        """`prefs` with the fields this update sets."""
        return replace(prefs, **{name: getattr(self, name) for name in self.given})


def _quiet_hours(dnd) -> tuple[str | None, str | None]:
    if dnd is None:
        return None, None
    if isinstance(dnd, dict) and set(dnd) == {"start", "end"} and all(
            _is_text(dnd[k], HHMM_RE) for k in ("start", "end")) and dnd["start"] != dnd["end"]:
        return dnd["start"], dnd["end"]
    raise InvalidInput("'do_not_disturb' must be null or {\"start\": \"HH:MM\", \"end\": \"HH:MM\"} "
                       "(24-hour, different times; it may wrap midnight)")


def _time_zone(zone) -> str:
    try:
        if not isinstance(zone, str) or not zone:
            raise ValueError
        ZoneInfo(zone)
    except (ValueError, ZoneInfoNotFoundError):
        raise InvalidInput("'time_zone' must be an IANA time zone name such as 'Europe/Berlin'") from None
    return zone


@dataclass(frozen=True)
class PushRetrySelection:
    """POST /api/admin/pushes/retry: which pushes to send again ({} means every failed one)."""

    filter: PushFilter

    @classmethod
    def parse(cls, body: dict) -> PushRetrySelection:
        for name in ("status", "provider"):  # a wrong type is refused, not read as "no filter"
            if body.get(name) is not None and not isinstance(body[name], str):
                raise InvalidInput(f"'{name}' must be a string or null")
        return cls(PushFilter.parse(body.get("status"), body.get("user_id"), body.get("provider")))
