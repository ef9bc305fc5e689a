"""Web Push provider (RFC 8030 delivery, RFC 8291 aes128gcm encryption, RFC 8292 VAPID).

`WebPushClient.send_many` posts each push to its subscription's endpoint (the
browser vendor's push service), up to MAX_CONCURRENT_SENDS at once from threads
sharing one keep-alive httpx client, and maps each answer to one outcome of
app.push.providers: 201 delivered; 404/410 the subscription is gone (dead token:
the device is removed); 429/5xx/network trouble temporary, with Retry-After;
anything else permanent. It never retries by itself: the push task owns the
retry budget.

The payload is JSON, encrypted for the subscription's p256dh/auth keys with a
fresh ephemeral key and salt per push (http_ece); the service worker decrypts
nothing itself (the browser does) and reads `kind` (docs/push.md §8.2).
Endpoints carry a per-browser secret, so logs name a device by a hash only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from app.config import Settings
from app.push.providers import (
    ALERT, BADGE_SYNC, DeadToken, Delivered, PermanentFailure, PushOutcome, PushRequest, TemporaryFailure,
    device_label, retry_after_seconds, shorten_to_fit, tls_context,
)
from app.push.providers.vapid import VapidSigner

log = logging.getLogger(__name__)

MAX_CONCURRENT_SENDS = 8
# RFC 8291 section 4: push services accept at least 4096 bytes of body; aes128gcm adds an
# 86-byte header (salt, record size, key id: the 65-byte ephemeral key), a 16-byte tag and a delimiter.
MAX_BODY_BYTES = 4096
MAX_PLAINTEXT_BYTES = MAX_BODY_BYTES - 86 - 16 - 1
NOTIFICATION_TTL_SECONDS = 24 * 3600  # the push service keeps an offline browser's push this long
BADGE_SYNC_TTL_SECONDS = 3600  # a silent update older than this is not worth delivering
GENERIC_BODY = "New message"
MAX_REASON_CHARS = 300
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")  # RFC 8030 section 5.4


def _b64decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def topic_of(conversation_id: str) -> str:
    """The Topic header (RFC 8030 §5.4: at most 32 base64url characters) of a conversation's pushes:
    a newer push replaces an undelivered older one of the same conversation."""
    if _TOPIC.fullmatch(conversation_id):
        return conversation_id
    return base64.urlsafe_b64encode(hashlib.sha256(conversation_id.encode()).digest()).rstrip(b"=").decode()[:32]


class WebPushClient:
    """Sends encrypted, VAPID-signed pushes to browsers' push services. Share one per process."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, timeout: float = 10.0):
        self._signer = VapidSigner(settings, clock)  # ValueError when VAPID_* is missing or unusable
        self._clock = clock
        self._http = httpx.Client(verify=tls_context(settings.webpush_ca_file, "WEBPUSH_CA_FILE"), timeout=httpx.Timeout(timeout, connect=5.0),
                                  follow_redirects=False,
                                  limits=httpx.Limits(max_connections=32, max_keepalive_connections=32,
                                                      keepalive_expiry=120.0))
        self._pool_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    @property
    def public_key(self) -> str:
        return self._signer.public_key

    def send_many(self, requests: list[PushRequest]) -> list[PushOutcome]:
        """`send` for each request, up to MAX_CONCURRENT_SENDS at once; one outcome per request, in
        order. Never raises for anything a push service or the network does."""
        if len(requests) <= 1:
            return [self.send(request) for request in requests]
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():  # made after a fork, where it is used
                self._pool = ThreadPoolExecutor(MAX_CONCURRENT_SENDS, thread_name_prefix="webpush")
                self._pool_pid = os.getpid()
            pool = self._pool
        return list(pool.map(self.send, requests))

    def send(self, request: PushRequest) -> PushOutcome:
        device = device_label(request.token)
        try:
            outcome = self._send(request)
        except Exception as exc:  # a bug of ours, not the push service's answer: retried, and loud
            log.error("webpush msg=%s device=%s: unexpected %s", request.msg_id, device, type(exc).__name__,
                      exc_info=True)
            outcome = TemporaryFailure(f"unexpected {type(exc).__name__}")
        level = logging.DEBUG if isinstance(outcome, Delivered) else logging.WARNING
        log.log(level, "webpush msg=%s device=%s kind=%s: %s", request.msg_id, device, request.kind, outcome)
        return outcome

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
            self._pool = None
        self._http.close()

    def _send(self, request: PushRequest) -> PushOutcome:
        sub = request.subscription or {}
        endpoint = sub.get("endpoint")
        if not endpoint or not sub.get("p256dh") or not sub.get("auth"):
            return DeadToken("no usable subscription stored for this device")
        parts = urlsplit(endpoint)
        if parts.scheme != "https" or not parts.hostname:
            return DeadToken("subscription endpoint is not https")
        plaintext = self.payload(request)
        if plaintext is None:
            return PermanentFailure("payload too large even without text")
        try:
            body = encrypt(plaintext, sub["p256dh"], sub["auth"])
        except ValueError:  # p256dh is not a point of the curve: no push to it can ever work
            return DeadToken("subscription key p256dh is not a P-256 public key")
        audience = f"{parts.scheme}://{parts.netloc}"
        silent = request.kind == BADGE_SYNC
        headers = {
            "authorization": self._signer.authorization(audience),
            "ttl": str(BADGE_SYNC_TTL_SECONDS if silent else NOTIFICATION_TTL_SECONDS),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "urgency": "normal" if silent or request.priority < 8 else "high",
            "topic": "badge" if silent else topic_of(request.conversation_id),
        }
        try:
            response = self._http.post(endpoint, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return TemporaryFailure(f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return TemporaryFailure(f"push service unreachable: {type(exc).__name__}")
        return self._outcome(response)

    def _outcome(self, response: httpx.Response) -> PushOutcome:
        status = response.status_code
        if status in (200, 201, 202):
            location = response.headers.get("location") or ""
            return Delivered(location.rsplit("/", 1)[-1][:128] or None)
        reason = f"HTTP {status}: {response.text.strip()[:MAX_REASON_CHARS]}".rstrip(": ")
        if status in (404, 410):  # RFC 8030 section 7.3: the subscription expired or was unsubscribed
            return DeadToken(reason)
        if status == 429 or status >= 500 or 300 <= status < 400:
            return TemporaryFailure(reason, retry_after_seconds(response.headers.get("retry-after"), self._clock()))
        return PermanentFailure(reason)  # 400 malformed, 401/403 VAPID refused, 413 too large, ...

    @staticmethod
    def payload(request: PushRequest) -> bytes | None:
        """The JSON the service worker gets, its body cut to fit the encrypted size limit."""
        if request.kind == BADGE_SYNC:
            data = {"kind": BADGE_SYNC, "badge": request.badge,
                    "withdraw": [{"conversation_id": c, "msg_id": m} for c, m in request.withdraw]}
            encoded = json.dumps(data, separators=(",", ":")).encode()
            return encoded if len(encoded) <= MAX_PLAINTEXT_BYTES else None
        title, body = (request.title, request.body) if request.preview else (None, GENERIC_BODY)
        data = {"kind": ALERT, "title": title, "body": body, "badge": request.badge,
                "conversation_id": request.conversation_id, "msg_id": request.msg_id, "tag": request.conversation_id}

        def encode() -> bytes:
            return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

        if len(encode()) > MAX_PLAINTEXT_BYTES and body:  # the longest prefix of the body that fits
            shorten_to_fit(data, "body", encode, MAX_PLAINTEXT_BYTES)
        encoded = encode()
        return encoded if len(encoded) <= MAX_PLAINTEXT_BYTES else None


def encrypt(plaintext: bytes, p256dh: str, auth: str) -> bytes:
    """RFC 8291 aes128gcm: one record, a fresh ephemeral ECDH key and salt per push."""
    server_key = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(plaintext, salt=os.urandom(16), private_key=server_key, dh=_b64decode(p256dh),
                            auth_secret=_b64decode(auth), version="aes128gcm")
