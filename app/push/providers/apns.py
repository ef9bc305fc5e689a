"""APNs provider: HTTP/2 to Apple with an ES256 provider token.

One `ApnsClient` holds one `httpx.AsyncClient(http2=True)` on an event loop
of its own (a background thread), so every push rides the same multiplexed
TLS connection, as Apple asks, and one provider token, reused until it is 50
minutes old. `send_many()` sends a batch of notifications as concurrent
HTTP/2 streams on that connection; `send()` is one of them. Each reply turns
into exactly one outcome of `app.push.providers`.

Apple's rules this module follows:
- a provider token older than 60 minutes is refused (ExpiredProviderToken), and
  renewing it more often than every 20 minutes is throttled
  (429 TooManyProviderTokenUpdates);
- the payload is at most 4096 bytes; `apns-collapse-id` at most 64 bytes;
- 410, and 400 BadDeviceToken / DeviceTokenNotForTopic, mean the device token
  is dead.

Device tokens and message text are never logged: a device is named by a short
hash of its token.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
from typing import Callable

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from app.config import Settings
from app.push.providers import (
    BADGE_SYNC, DeadToken, Delivered, PermanentFailure, PushOutcome, PushRequest, TemporaryFailure, device_label,
    load_p256_key, retry_after_seconds, shorten_to_fit, tls_context,
)

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
TOKEN_RENEW_AFTER_SECONDS = 50 * 60  # Apple refuses provider tokens older than 60 minutes
FORCED_RENEWAL_MIN_INTERVAL_SECONDS = 20 * 60  # faster renewals earn TooManyProviderTokenUpdates
NOTIFICATION_TTL_SECONDS = 24 * 3600  # apns-expiration: Apple keeps retrying an offline device this long
BADGE_SYNC_TTL_SECONDS = 3600  # a silent badge update older than this is not worth delivering
GENERIC_BODY = "New message"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Apple closes idle connections itself; keep ours well past httpx's 5 s default so
# sparse pushes do not pay a TLS handshake each (Apple treats connection churn as abuse).
DEFAULT_LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=600.0)
# Streams in flight at once on the connection (Apple allows many more; the
# server's SETTINGS_MAX_CONCURRENT_STREAMS caps it too).
DEFAULT_MAX_STREAMS = 100

DEAD_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
PROVIDER_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})
REQUIRED_SETTINGS = (
    ("apns_key_file", "APNS_KEY_FILE"),
    ("apns_key_id", "APNS_KEY_ID"),
    ("apns_team_id", "APNS_TEAM_ID"),
    ("apns_topic", "APNS_TOPIC"),
    ("apns_base_url", "APNS_BASE_URL"),
)
_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]{1,400}")
_DEVICE_PATH = re.compile(r"/3/device/([0-9a-fA-F]+)")


class _HideDeviceTokensFilter(logging.Filter):
    """httpx logs each request URL at INFO, and an APNs URL ends in the device token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_hide_device_token(arg) for arg in record.args)
        return True


def _hide_device_token(arg):
    text = str(arg) if isinstance(arg, httpx.URL) else arg
    if isinstance(text, str) and "/3/device/" in text:
        return _DEVICE_PATH.sub(lambda m: f"/3/device/<{device_label(m.group(1))}>", text)
    return arg


logging.getLogger("httpx").addFilter(_HideDeviceTokensFilter())


class ApnsClient:
    """Sends alert notifications to Apple.

    Thread-safe: share one client per worker process. All requests go through
    one event loop (a daemon thread started at the first send) and one
    `httpx.AsyncClient`: concurrent sends, from `send_many()` or from several
    threads calling `send()`, become concurrent HTTP/2 streams of the same
    connection, at most `max_streams` at once. (httpcore's *sync* HTTP/2
    connection corrupts its h2 state when threads send on it at once,
    encode/httpcore#908; the async one multiplexes properly.) `close()` (or a
    `with` block) closes the connection and stops the loop.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self._signing_key = _load_signing_key(settings)
        self._key_id = settings.apns_key_id
        self._team_id = settings.apns_team_id
        self._topic = settings.apns_topic
        self._base_url = settings.apns_base_url.rstrip("/")
        self._clock = clock
        self._tls = _tls_context(settings)
        self._timeout = {"timeout": (timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)).as_dict()}
        self._max_streams = max(1, max_streams)
        self._lock = threading.Lock()  # provider token
        self._loop_lock = threading.Lock()  # starting and stopping the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_pid: int | None = None
        # httpx's transport, not an AsyncClient: a push needs no cookies, redirects, auth flows or
        # event hooks, and skipping them saves a fifth of a request's CPU. Made and used on the loop only.
        self._http: httpx.AsyncHTTPTransport | None = None
        self._streams: asyncio.Semaphore | None = None
        self._token: str | None = None
        self._token_issued_at = 0.0
        self._last_forced_renewal: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> "ApnsClient":
        """Build a client; raises ValueError naming the APNS_* setting that is missing or unusable."""
        return cls(settings, **kwargs)

    def __enter__(self) -> "ApnsClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP/2 connection and stop the loop thread."""
        with self._loop_lock:
            loop, thread, self._loop, self._loop_thread = self._loop, self._loop_thread, None, None
            if loop is None or self._loop_pid != os.getpid():
                return  # never started here (a forked child does not own its parent's loop)
            http, self._http, self._streams = self._http, None, None
        if http is not None:
            try:
                asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(10)
            except Exception:  # closing is best effort
                logger.debug("APNs connection did not close cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()

    def send(self, request: PushRequest) -> PushOutcome:
        """Push one notification; never raises for anything Apple or the network does."""
        return self.send_many([request])[0]

    def send_many(self, requests: list[PushRequest]) -> list[PushOutcome]:
        """Push notifications concurrently as HTTP/2 streams of the one connection.

        One outcome per request, in order. Never raises for anything Apple or
        the network does; each request is bounded by the client's timeout.
        """
        if not requests:
            return []
        return asyncio.run_coroutine_threadsafe(self._send_all(list(requests)), self._running_loop()).result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None or self._loop_pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="apns-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread, self._loop_pid = loop, thread, os.getpid()
                self._http, self._streams = None, None
            return self._loop

    async def _send_all(self, requests: list[PushRequest]) -> list[PushOutcome]:
        if self._http is None:
            self._http = httpx.AsyncHTTPTransport(http2=True, verify=self._tls, limits=DEFAULT_LIMITS)
            self._streams = asyncio.Semaphore(self._max_streams)
        results = await asyncio.gather(*(self._send_one(request) for request in requests), return_exceptions=True)
        outcomes = []
        for request, result in zip(requests, results):
            if isinstance(result, BaseException):  # a bug of ours, not Apple's answer: retried, and loud
                logger.error("APNs msg_id=%s device=%s: unexpected %s", request.msg_id, device_label(request.token),
                             type(result).__name__, exc_info=result)
                result = TemporaryFailure(f"unexpected {type(result).__name__}")
            outcomes.append(result)
        return outcomes

    async def _send_one(self, request: PushRequest) -> PushOutcome:
        device = device_label(request.token)
        if not _DEVICE_TOKEN.fullmatch(request.token):
            # Not an APNs token at all: no request can succeed, and it must not reach a URL path.
            logger.warning("APNs msg_id=%s device=%s: device token is not hex, dropping it", request.msg_id, device)
            return DeadToken("BadDeviceToken")
        payload = self._payload(request)
        if payload is None:
            logger.error("APNs msg_id=%s device=%s: payload exceeds %d bytes even without text",
                         request.msg_id, device, MAX_PAYLOAD_BYTES)
            return PermanentFailure("PayloadTooLarge")
        async with self._streams:
            provider_token = self._provider_token()
            try:
                response = await self._http.handle_async_request(httpx.Request(
                    "POST", f"{self._base_url}/3/device/{request.token}", content=payload,
                    headers=self._headers(request, provider_token), extensions=self._timeout))
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            except httpx.TimeoutException as exc:
                logger.warning("APNs msg_id=%s device=%s: timed out (%s)", request.msg_id, device,
                               type(exc).__name__)
                return TemporaryFailure(f"timeout: {type(exc).__name__}")
            except httpx.HTTPError as exc:
                detail = str(exc).replace(request.token, device) or type(exc).__name__
                logger.warning("APNs msg_id=%s device=%s: %s: %s", request.msg_id, device, type(exc).__name__, detail)
                return TemporaryFailure(f"{type(exc).__name__}: {detail}")
        outcome = self._outcome(response, provider_token)
        if isinstance(outcome, Delivered):  # (the caller logs each outcome at INFO, apns-id included)
            logger.debug("APNs msg_id=%s device=%s delivered apns_id=%s", request.msg_id, device, outcome.provider_id)
        else:
            logger.warning("APNs msg_id=%s device=%s: HTTP %d -> %s", request.msg_id, device,
                           response.status_code, outcome)
        return outcome

    # -- provider token -------------------------------------------------------------

    def _provider_token(self) -> str:
        with self._lock:
            now = self._clock()
            if self._token is None or now - self._token_issued_at >= TOKEN_RENEW_AFTER_SECONDS:
                self._token = jwt.encode(
                    {"iss": self._team_id, "iat": int(now)},
                    self._signing_key,
                    algorithm="ES256",
                    headers={"kid": self._key_id, "typ": None},  # Apple's header is exactly alg + kid
                )
                self._token_issued_at = now
                logger.info("APNs provider token signed (kid=%s)", self._key_id)
            return self._token

    def _renew_refused_token(self, refused: str, reason: str) -> None:
        """Drop a token Apple refused, at most once per 20 minutes.

        A key Apple keeps refusing would otherwise mint a token per push and
        add TooManyProviderTokenUpdates to the original problem.
        """
        with self._lock:
            if self._token != refused:
                return  # another thread already replaced it
            now = self._clock()
            if (self._last_forced_renewal is not None
                    and now - self._last_forced_renewal < FORCED_RENEWAL_MIN_INTERVAL_SECONDS):
                logger.error("APNs refused the provider token (%s) again; keeping it until %d s after the last "
                             "renewal: check APNS_KEY_FILE, APNS_KEY_ID and APNS_TEAM_ID", reason,
                             FORCED_RENEWAL_MIN_INTERVAL_SECONDS)
                return
            logger.warning("APNs refused the provider token (%s); signing a new one for the next push", reason)
            self._token = None
            self._last_forced_renewal = now

    # -- request --------------------------------------------------------------------

    def _headers(self, request: PushRequest, provider_token: str) -> dict[str, str]:
        if request.kind == BADGE_SYNC:  # Apple: a background push goes at priority 5, and shows nothing
            return {"authorization": f"bearer {provider_token}", "apns-topic": self._topic,
                    "apns-push-type": "background", "apns-priority": "5",
                    "apns-expiration": str(int(self._clock()) + BADGE_SYNC_TTL_SECONDS)}
        headers = {
            "authorization": f"bearer {provider_token}",
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if request.priority >= 8 else "5",
            "apns-expiration": str(int(self._clock()) + NOTIFICATION_TTL_SECONDS),
        }
        if request.conversation_id:
            headers["apns-collapse-id"] = _collapse_id(request.conversation_id)
        return headers

    def _payload(self, request: PushRequest) -> bytes | None:
        """The JSON payload, its text shortened to fit 4096 bytes; None if nothing fits."""
        if request.kind == BADGE_SYNC:
            return self._badge_sync_payload(request)
        alert = {"title": request.title, "body": request.body} if request.preview else {"body": GENERIC_BODY}
        if not alert.get("title", True):
            del alert["title"]
        aps: dict = {"alert": alert, "badge": request.badge}
        if request.sound:
            aps["sound"] = request.sound
        aps["thread-id"] = request.conversation_id
        aps["mutable-content"] = 1
        payload = {"aps": aps, "msg_id": request.msg_id, "conversation_id": request.conversation_id}

        def encode() -> bytes:
            return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

        for field in ("body", "title"):  # the body goes first: the title names the sender
            if len(encode()) <= MAX_PAYLOAD_BYTES:
                break
            if field in alert:
                shorten_to_fit(alert, field, encode, MAX_PAYLOAD_BYTES)
        data = encode()
        return data if len(data) <= MAX_PAYLOAD_BYTES else None

    @staticmethod
    def _badge_sync_payload(request: PushRequest) -> bytes | None:
        """A background push: the new badge, and the notifications for the app to remove (their
        apns-collapse-id, thread-id and msg id), newest conversations first if they do not all fit."""
        withdraw = [{"collapse_id": _collapse_id(c), "thread_id": c, "msg_id": m} for c, m in request.withdraw]
        while True:
            data = json.dumps({"aps": {"content-available": 1, "badge": request.badge}, "kind": BADGE_SYNC,
                               "withdraw": withdraw}, separators=(",", ":")).encode()
            if len(data) <= MAX_PAYLOAD_BYTES or not withdraw:
                return data if len(data) <= MAX_PAYLOAD_BYTES else None
            withdraw = withdraw[:-1]

    # -- response -------------------------------------------------------------------

    def _outcome(self, response: httpx.Response, provider_token: str) -> PushOutcome:
        status = response.status_code
        if status == 200:
            return Delivered(response.headers.get("apns-id"))
        reason = _reason(response)
        if status == 410 or (status == 400 and reason in DEAD_TOKEN_REASONS):
            return DeadToken(reason)
        if status == 403 and reason in PROVIDER_TOKEN_REASONS:
            self._renew_refused_token(provider_token, reason)
            return TemporaryFailure(reason)
        if 400 <= status < 500 and status != 429:
            return PermanentFailure(reason)
        # 429, 5xx, and anything Apple does not send (a proxy's 3xx, say): worth a bounded retry.
        return TemporaryFailure(reason, retry_after_seconds(response.headers.get("retry-after"), self._clock()))


def _load_signing_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    for attr, env_name in REQUIRED_SETTINGS:
        if not getattr(settings, attr):
            raise ValueError(f"APNs is not configured: {env_name} is not set")
    return load_p256_key(settings.apns_key_file, "APNS_KEY_FILE", " (.p8)", ", as Apple's .p8 keys are")


def _tls_context(settings: Settings) -> ssl.SSLContext:
    return tls_context(settings.apns_ca_file, "APNS_CA_FILE")


def _collapse_id(conversation_id: str) -> str:
    if len(conversation_id.encode()) <= MAX_COLLAPSE_ID_BYTES:
        return conversation_id
    # Still one stable id per conversation, and a sha256 hex digest is exactly 64 bytes.
    return hashlib.sha256(conversation_id.encode()).hexdigest()


def _reason(response: httpx.Response) -> str:
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) and reason else f"HTTP {response.status_code}"

