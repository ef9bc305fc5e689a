"""REST request bodies, parsed at the boundary into typed requests.

Each request is a frozen dataclass with a `parse(body)` classmethod that
returns it or raises InvalidInput (one 400) naming the field and what it must
be; views hand the parsed object's values to the domain, never a raw body.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.accounts.auth import validate_credentials
from app.chat.conversations import HISTORY_DEFAULT_LIMIT
from app.chat.search import SEARCH_DEFAULT_LIMIT
from app.chat.groups import ROLES, clean_group_name
from app.errors import InvalidInput
from app.push.admin import PushFilter
from app.push.settings import CHANNELS, PLATFORMS, PushPreferences
from app.wire import CONVERSATION_ID_RE, parse_id

DEVICE_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,60}")
HHMM_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
MAX_MUTED = 1000
MAX_IDS_PER_REQUEST = 1000  # user ids in one group request
USERNAME_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{2,32}")
MAX_PAGE = 10**15  # (page - 1) * per_page is the database's OFFSET, which must stay below 2^63


def _refuse_unknown(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _is_text(value, pattern: re.Pattern) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _user_ids(body: dict, name: str) -> list[int]:
    raw = body.get(name, [])
    if not isinstance(raw, list):
        raise InvalidInput(f"'{name}' must be a list of user id strings")
    if len(raw) > MAX_IDS_PER_REQUEST:
        raise InvalidInput(f"'{name}' holds at most {MAX_IDS_PER_REQUEST} ids per request")
    return [parse_id(value, name) for value in raw]


@dataclass(frozen=True)
class Registration:
    """POST /api/auth/register."""

    username: str
    password: str

    @classmethod
    def parse(cls, body: dict) -> Registration:
        return cls(*validate_credentials(body.get("username"), body.get("password")))


@dataclass(frozen=True)
class Login:
    """POST /api/auth/login (and the dashboard's login form)."""

    username: str
    password: str

    @classmethod
    def parse(cls, body) -> Login:
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise InvalidInput("username and password must be strings")
        return cls(username, password)


@dataclass(frozen=True)
class Refresh:
    """POST /api/auth/refresh."""

    refresh_token: str

    @classmethod
    def parse(cls, body: dict) -> Refresh:
        _refuse_unknown(body, {"refresh_token"})
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise InvalidInput("'refresh_token' must be the refresh token of the last login or refresh")
        return cls(token)


@dataclass(frozen=True)
class PasswordChange:
    """PUT /api/account/password (the new one is checked against the registration rules)."""

    old_password: str
    new_password: str

    @classmethod
    def parse(cls, body: dict) -> PasswordChange:
        _refuse_unknown(body, {"old_password", "new_password"})
        old, new = body.get("old_password"), body.get("new_password")
        if not isinstance(old, str) or not old:
            raise InvalidInput("'old_password' must be your current password")
        if not isinstance(new, str):
            raise InvalidInput("'new_password' must be a string")
        return cls(old, new)


def _whole_number(args, name: str, default: int | None) -> int | None:
    raw = args.get(name)
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) >= 2**63:
        raise InvalidInput(f"query parameter '{name}' must be a whole number below 2^63")
    return int(raw)


@dataclass(frozen=True)
class HistoryPage:
    """GET /api/conversations/{id}/messages?before=&limit=."""

    before: int | None
    limit: int

    @classmethod
    def parse(cls, args) -> HistoryPage:
        return cls(_whole_number(args, "before", None), _whole_number(args, "limit", HISTORY_DEFAULT_LIMIT))


@dataclass(frozen=True)
class GroupCreation:
    """POST /api/groups: a name and the members besides the creator."""

    name: str
    members: list[int]

    @classmethod
    def parse(cls, body: dict) -> GroupCreation:
        members = _user_ids(body, "members")
        return cls(clean_group_name(body.get("name")), members)


@dataclass(frozen=True)
class GroupRename:
    """PATCH /api/groups/{id}."""

    name: str

    @classmethod
    def parse(cls, body: dict) -> GroupRename:
        return cls(clean_group_name(body.get("name")))


@dataclass(frozen=True)
class MemberAddition:
    """POST /api/groups/{id}/members: at least one user id."""

    user_ids: list[int]

    @classmethod
    def parse(cls, body: dict) -> MemberAddition:
        ids = _user_ids(body, "user_ids")
        if not ids:
            raise InvalidInput("'user_ids' must name at least one user")
        return cls(ids)


@dataclass(frozen=True)
class RoleChange:
    """PATCH /api/groups/{id}/members/{user_id}."""

    role: str

    @classmethod
    def parse(cls, body: dict) -> RoleChange:
        role = body.get("role")
        if role not in ROLES:
            raise InvalidInput(f"'role' must be one of {', '.join(ROLES)}")
        return cls(role)


@dataclass(frozen=True)
class DeviceRegistration:
    """POST /api/devices: a push token of this user's device."""

    platform: str
    token: str
    subscription: dict | None = None  # webpush: {"endpoint", "p256dh", "auth"} (WebPushSubscription)

    @classmethod
    def parse(cls, body: dict) -> DeviceRegistration:
        platform, token = body.get("platform"), body.get("token")
        if platform not in PLATFORMS:
            raise InvalidInput(f"'platform' must be one of {', '.join(PLATFORMS)}")
        if platform == "webpush":
            if token is not None:
                raise InvalidInput("a webpush device has no 'token': send the browser's 'subscription'")
            subscription = WebPushSubscription.parse(body.get("subscription"))
            return cls(platform, subscription.token, subscription.stored())
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
class PushListPage:
    """GET /api/admin/pushes?status=&user_id=&provider=&page=&per_page=."""

    filter: PushFilter
    page: int
    per_page: int

    @classmethod
    def parse(cls, args) -> PushListPage:
        def number(name: str, default: int) -> int:
            raw = args.get(name)
            if not raw:
                return default
            if not (raw.isascii() and raw.isdigit()):
                raise InvalidInput(f"'{name}' must be a whole number")
            return int(raw) if len(raw) <= 19 else MAX_PAGE + 1  # too large either way (checked below)
        flt = PushFilter.parse(args.get("status"), args.get("user_id"), args.get("provider"))
        page = number("page", 1)
        if page > MAX_PAGE:
            raise InvalidInput(f"'page' must be at most {MAX_PAGE}")
        return cls(flt, page, number("per_page", 50))


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


@dataclass(frozen=True)
class SearchPage:
    """GET /api/search/messages?q=&conversation_id=&before=&limit= (q is checked by app.chat.search)."""

    q: str | None
    conversation_id: str | None
    before: int | None
    limit: int

    @classmethod
    def parse(cls, args) -> SearchPage:
        conversation_id = args.get("conversation_id") or None
        if conversation_id is not None and not _is_text(conversation_id, CONVERSATION_ID_RE):
            raise InvalidInput("'conversation_id' must be a conversation id such as p_1_2 or g_7")
        return cls(args.get("q"), conversation_id, _whole_number(args, "before", None),
                   _whole_number(args, "limit", SEARCH_DEFAULT_LIMIT))


@dataclass(frozen=True)
class UserLookup:
    """GET /api/users?username= (one exact name) or ?prefix= (names starting with it); with both,
    the exact lookup."""

    username: str | None
    prefix: str | None

    @classmethod
    def parse(cls, args) -> UserLookup:
        username, prefix = args.get("username"), args.get("prefix")
        if prefix is None or username is not None:
            return cls(username, None)  # the exact lookup checks its own parameter
        if not USERNAME_PREFIX_RE.fullmatch(prefix):
            raise InvalidInput("'prefix' must be 2-32 characters of letters, digits, '_', '.' or '-'")
        return cls(None, prefix)


@dataclass(frozen=True)
class MediaUpload:
    """POST /api/media?filename=: the declared type and length of the raw body, and its name
    (cleaned by app.media.uploads; the body itself is streamed, never parsed here)."""

    content_type: str
    declared_length: int | None
    filename: str | None

    MAX_FILENAME_PARAM = 1000

    @classmethod
    def parse(cls, args, mimetype: str | None, content_length: int | None) -> MediaUpload:
        filename = args.get("filename")
        if filename is not None and len(filename) > cls.MAX_FILENAME_PARAM:
            raise InvalidInput(f"'filename' must be at most {cls.MAX_FILENAME_PARAM} characters")
        return cls(mimetype or "", content_length, filename or None)


WEBPUSH_ENDPOINT_MAX = 2048
WEBPUSH_SUBSCRIPTION_FIELDS = {"endpoint", "keys", "expirationTime"}


def _base64url_bytes(value) -> bytes | None:
    """Base64url (RFC 4648 section 5) with or without padding, as browsers encode subscription keys."""
    if not isinstance(value, str) or not value or not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", value):
        return None
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class WebPushSubscription:
    """POST /api/devices with "platform": "webpush": the browser's PushSubscription.toJSON().

    {"endpoint": "https://…", "expirationTime": null, "keys": {"p256dh": "…", "auth": "…"}}:
    an https endpoint of at most 2048 characters, p256dh an uncompressed P-256 point (65 bytes,
    the first 0x04) and auth 16 bytes, both base64url (RFC 8291 section 2). A p256dh that is not
    on the curve is found at the first push, which removes the device.
    """

    endpoint: str
    p256dh: str
    auth: str

    @classmethod
    def parse(cls, raw) -> WebPushSubscription:
        if not isinstance(raw, dict):
            raise InvalidInput("'subscription' must be the browser's PushSubscription JSON "
                               "({\"endpoint\", \"keys\": {\"p256dh\", \"auth\"}})")
        unknown = sorted(set(raw) - WEBPUSH_SUBSCRIPTION_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown subscription field(s) {', '.join(unknown)}; "
                               f"allowed: {', '.join(sorted(WEBPUSH_SUBSCRIPTION_FIELDS))}")
        endpoint = raw.get("endpoint")
        if not isinstance(endpoint, str) or not 1 <= len(endpoint) <= WEBPUSH_ENDPOINT_MAX \
                or not endpoint.isascii() or any(c.isspace() for c in endpoint):
            raise InvalidInput(f"'subscription.endpoint' must be an https URL of at most {WEBPUSH_ENDPOINT_MAX} "
                               "characters")
        try:
            parts = urlsplit(endpoint)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            raise InvalidInput("'subscription.endpoint' must be an https URL (the push service's, without "
                               "credentials)")
        expires = raw.get("expirationTime")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires < 0):
            raise InvalidInput("'subscription.expirationTime' must be null or a time in milliseconds")
        keys = raw.get("keys")
        if not isinstance(keys, dict) or set(keys) != {"p256dh", "auth"}:
            raise InvalidInput("'subscription.keys' must be {\"p256dh\", \"auth\"}")
        p256dh, auth = _base64url_bytes(keys["p256dh"]), _base64url_bytes(keys["auth"])
        if p256dh is None or len(p256dh) != 65 or p256dh[0] != 4:
            raise InvalidInput("'subscription.keys.p256dh' must be base64url of an uncompressed P-256 public "
                               "key (65 bytes)")
        if auth is None or len(auth) != 16:
            raise InvalidInput("'subscription.keys.auth' must be base64url of 16 bytes")
        return cls(endpoint, keys["p256dh"].rstrip("="), keys["auth"].rstrip("="))

    @property
    def token(self) -> str:
        """The device token of a subscription: one per endpoint, short enough for the token column
        and for DELETE /api/devices/{token}."""
        return "webpush:" + hashlib.sha256(self.endpoint.encode()).hexdigest()

    def stored(self) -> dict:
        return {"endpoint": self.endpoint, "p256dh": self.p256dh, "auth": self.auth}



@dataclass(frozen=True)
class PrivacyUpdate:
    """PUT /api/privacy."""

    presence: str

    @classmethod
    def parse(cls, body: dict) -> PrivacyUpdate:
        from app.accounts.privacy import parse_presence_visibility

        _refuse_unknown(body, {"presence"})
        return cls(parse_presence_visibility(body.get("presence")))


@dataclass(frozen=True)
class AccountDeletion:
    """DELETE /api/account: the password confirms it."""

    password: str

    @classmethod
    def parse(cls, body: dict) -> AccountDeletion:
        password = body.get("password")
        if not isinstance(password, str) or not password:
            raise InvalidInput("'password' must be your current password")
        return cls(password)


@dataclass(frozen=True)
class AuditPage:
    """GET /api/admin/audit?page=&per_page=&action=."""

    page: int
    per_page: int
    action: str | None

    @classmethod
    def parse(cls, args) -> AuditPage:
        page = _whole_number(args, "page", 1)
        per_page = _whole_number(args, "per_page", 50)
        if not 1 <= page <= MAX_PAGE:
            raise InvalidInput(f"'page' must be from 1 to {MAX_PAGE}")
        if not 1 <= per_page <= 200:
            raise InvalidInput("'per_page' must be from 1 to 200")
        action = args.get("action")
        if action is not None and not re.fullmatch(r"[a-z_.]{1,64}", action):
            raise InvalidInput("'action' must be an action name such as user.disabled")
        return cls(page, per_page, action)


@dataclass(frozen=True)
class EmailVerification:
    """POST /api/push-settings/email/verify."""

    code: str

    @classmethod
    def parse(cls, body: dict) -> EmailVerification:
        _refuse_unknown(body, {"code"})
        code = body.get("code")
        if not isinstance(code, str) or not re.fullmatch(r"[0-9]{6}", code.strip()):
            raise InvalidInput("'code' must be the 6-digit code from the verification email")
        return cls(code.strip())
