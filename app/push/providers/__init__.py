"""Push providers (APNs, FCM, email): each a small client behind `PushProvider`, whose one
I/O method `send_many` takes a batch of `PushRequest`s and answers one outcome for each.

Every provider reply falls into exactly one outcome (after matrix-org/sygnal):
delivered; the token is dead (remove the device, never retry); a temporary
failure (retry with backoff, honouring the provider's Retry-After); or a
permanent failure (give up and record why).
"""
from __future__ import annotations

import email.utils
import hashlib
import math
import ssl
from dataclasses import dataclass
from datetime import timezone
from typing import Protocol


ALERT, BADGE_SYNC = "alert", "badge_sync"


@dataclass(frozen=True)
class PushRequest:
    """What to show on one device, or what to mail: built by app.push.attempts from a push_log row.

    A digest mail is a request of its own kind: `token` is the email address,
    `title` the subject, `body` the text and `badge` the number of unread messages.
    """

    token: str
    title: str
    body: str
    badge: int  # the user's total unread
    conversation_id: str  # thread id / collapse key: newer pushes replace older ones
    msg_id: str
    priority: int = 8  # push_tasks priority: private 8, group 5, digest 1
    sound: str = "default"
    preview: bool = True  # False: the device shows "New message", not the sender and text
    kind: str = ALERT  # ALERT: a notification to show; BADGE_SYNC: silent, set the badge and withdraw
    # BADGE_SYNC: the shown notifications to remove, as (conversation_id, msg_id) pairs; the
    # conversation id is their collapse id / tag / Topic
    withdraw: tuple[tuple[str, str], ...] = ()
    subscription: dict | None = None  # webpush: {"endpoint", "p256dh", "auth"} of the device


@dataclass(frozen=True)
class Delivered:
    provider_id: str | None = None  # apns-id / FCM message name, for support tickets


@dataclass(frozen=True)
class DeadToken:
    reason: str


@dataclass(frozen=True)
class TemporaryFailure:
    reason: str
    retry_after: float | None = None  # seconds, from the provider's Retry-After


@dataclass(frozen=True)
class PermanentFailure:
    reason: str


PushOutcome = Delivered | DeadToken | TemporaryFailure | PermanentFailure


class PushProvider(Protocol):
    """A provider client: one per worker process, shared by its threads."""

    def send_many(self, requests: list[PushRequest]) -> list[PushOutcome]:
        """Send each request; one outcome per request, in order. Never raises for anything the
        provider or the network does."""


def device_label(token: str) -> str:
    """A short, stable name for a device token that is safe to log."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header as seconds from `now` (epoch seconds): delta-seconds or an HTTP date
    (RFC 9110 section 10.2.3); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def load_p256_key(path: str, setting: str, pem_hint: str = "", curve_hint: str = ""):
    """An unencrypted EC P-256 private key in PEM (an APNs .p8 key, a VAPID key), or ValueError
    naming the setting and what is wrong with the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ValueError(f"{setting} {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{setting} {path!r} is not an unencrypted PEM private key{pem_hint}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{setting} {path!r} is not an EC P-256 key{curve_hint}")
    return key


def tls_context(ca_file: str, setting: str) -> ssl.SSLContext:
    """The public CAs (certifi), plus the extra CA bundle `ca_file` names (a local fake's), if any."""
    import certifi

    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{setting} {ca_file!r} is not a readable PEM CA bundle: {exc}") from None
    return context


ELLIPSIS = "\u2026"


def shorten_to_fit(container: dict, field: str, encode, limit: int) -> None:
    """Cut container[field] to the longest prefix (plus an ellipsis) with which `encode()` stays
    within `limit` bytes, or to "" if none does."""
    text = container[field]

    def fits(keep: int) -> bool:
        container[field] = text[:keep].rstrip() + ELLIPSIS if keep else ""
        return len(encode()) <= limit

    low, high = 0, len(text) - 1  # keep-count search; escaping makes bytes per character vary
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    fits(low)
