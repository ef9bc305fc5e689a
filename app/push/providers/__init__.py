"""Push providers (APNs, FCM, email): each a small client with one I/O method.

Every provider reply falls into exactly one outcome (after matrix-org/sygnal):
delivered; the token is dead (remove the device, never retry); a temporary
failure (retry with backoff, honouring the provider's Retry-After); or a
permanent failure (give up and record why).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushRequest:
    """What to show on one device. Built by the push service from a message."""

    token: str
    title: str
    body: str
    badge: int  # the user's total unread
    conversation_id: str  # thread id / collapse key: newer pushes replace older ones
    msg_id: str
    priority: int = 8  # push_tasks priority: private 8, group 5, digest 1
    sound: str = "default"


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
