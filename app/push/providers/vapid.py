"""VAPID (RFC 8292): the application server's identity towards Web Push services.

The key is an EC P-256 private key in PEM (VAPID_PRIVATE_KEY_FILE); its public half,
base64url of the uncompressed point, is what browsers subscribe with
(`GET /api/push/vapid-public-key`). Each push carries
`Authorization: vapid t=<ES256 JWT>,k=<public key>` with the claims aud (the push
service's origin), exp (at most 24 h ahead) and sub (VAPID_SUBJECT). Signing is
py-vapid's; a token is reused per audience until it is an hour old.
"""
from __future__ import annotations

import base64
import functools
import os
import threading
import time
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException

from app.config import Settings
from app.push.providers import load_p256_key

TOKEN_LIFETIME_SECONDS = 12 * 3600  # exp; push services refuse more than 24 h
TOKEN_REUSE_SECONDS = 3600  # sign again for an audience after this long


def load_vapid_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """The VAPID private key, or ValueError naming the setting that is missing or unusable."""
    if not settings.vapid_private_key_file:
        raise ValueError("web push is not configured: VAPID_PRIVATE_KEY_FILE is not set")
    if not settings.vapid_subject:
        raise ValueError("web push is not configured: VAPID_SUBJECT is not set (mailto: or https: contact)")
    return load_p256_key(settings.vapid_private_key_file, "VAPID_PRIVATE_KEY_FILE",
                         curve_hint=" (RFC 8292 needs ES256)")


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


@functools.lru_cache(maxsize=4)
def _public_key_of(path: str, subject: str, mtime: float) -> str | None:
    try:
        return public_key_b64(load_vapid_key(Settings(vapid_private_key_file=path, vapid_subject=subject)))
    except ValueError:
        return None


def vapid_public_key_of(settings: Settings) -> str | None:
    """The applicationServerKey browsers subscribe with, or None when web push is not configured."""
    try:
        mtime = os.stat(settings.vapid_private_key_file).st_mtime if settings.vapid_private_key_file else 0.0
    except OSError:
        return None
    return _public_key_of(settings.vapid_private_key_file, settings.vapid_subject, mtime)


class VapidSigner:
    """`authorization(audience)`: the Authorization header for a push service origin. Thread-safe."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self._vapid = Vapid02(load_vapid_key(settings))
        self._subject = settings.vapid_subject
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, str]] = {}
        try:  # py-vapid checks sub and aud; a bad subject is a configuration error, found at start
            self._vapid.sign({"aud": "https://push.example", "sub": self._subject,
                              "exp": int(clock()) + TOKEN_LIFETIME_SECONDS})
        except VapidException as exc:
            raise ValueError(f"VAPID_SUBJECT {self._subject!r} is refused: {exc}") from None
        self.public_key = public_key_b64(self._vapid.private_key)

    def authorization(self, audience: str) -> str:
        now = self._clock()
        with self._lock:
            cached = self._tokens.get(audience)
            if cached is None or now - cached[0] >= TOKEN_REUSE_SECONDS:
                header = self._vapid.sign({"aud": audience, "sub": self._subject,
                                           "exp": int(now) + TOKEN_LIFETIME_SECONDS})["Authorization"]
                cached = self._tokens[audience] = (now, header)
            return cached[1]
