"""Firebase Cloud Messaging (HTTP v1) provider, built on pyfcm and google-auth.

`FcmClient.send` is the only network I/O: it posts one message and maps FCM's
answer to exactly one push outcome (see app.push.providers); `send_many` runs
it for a batch, a few at a time. It never sleeps or
retries on its own (apart from one token refresh on a 401): the push task owns
the retry budget and backoff and honours the Retry-After we return.

FCM reference: https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import service_account
from pyfcm import FCMNotification
from requests.adapters import HTTPAdapter

from app.config import Settings
from app.push.providers import (
    BADGE_SYNC, DeadToken, Delivered, PermanentFailure, PushOutcome, PushRequest, TemporaryFailure, device_label,
    retry_after_seconds,
)

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# Shown instead of sender and text when the user turned previews off (the same words as the APNs alert).
GENERIC_BODY = "New message"
HIGH_PRIORITY_FROM = 8  # push_tasks priority at or above which Android wakes the device (private chats)
QUOTA_RETRY_AFTER_SECONDS = 60.0  # FCM asks for at least a minute after a 429 that names no Retry-After
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_CONCURRENT_SENDS = 8  # send_many's requests in flight at once (threads; the session pools 10 connections)
MAX_REASON_CHARS = 300


class _PyfcmAtBaseUrl(FCMNotification):
    """pyfcm's v1 message builder and endpoint, aimed at FCM_BASE_URL.

    pyfcm hard-codes ``https://fcm.googleapis.com/v1/projects`` in the class
    attribute FCM_END_POINT_BASE; an instance attribute shadows it, and pyfcm's
    own ``fcm_end_point`` still appends ``/<project_id>/messages:send``.

    Only ``parse_payload`` and ``fcm_end_point`` are used. pyfcm's
    ``send_request`` sleeps for any Retry-After and then recurses without a
    bound, its session's urllib3 Retry re-sends 502/503 itself (hiding
    Retry-After from the task), it re-fetches the OAuth token every 30 minutes
    whatever its lifetime, and ``parse_response`` drops FCM's errorCode, so
    FcmClient does the HTTP exchange itself.
    """

    def __init__(self, base_url: str, credentials: service_account.Credentials):
        super().__init__(credentials=credentials)
        self.FCM_END_POINT_BASE = f"{base_url.rstrip('/')}/v1/projects"


def load_credentials(path: str) -> service_account.Credentials:
    """Read the service-account JSON named by FCM_CREDENTIALS_FILE, or refuse clearly."""
    if not path:
        raise ValueError("FCM_CREDENTIALS_FILE is not set: point it at the Firebase service-account JSON "
                         "(Firebase console > Project settings > Service accounts)")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError as exc:
        raise ValueError(f"FCM_CREDENTIALS_FILE={path!r} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"FCM_CREDENTIALS_FILE={path!r} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("type", "service_account") != "service_account":
        raise ValueError(f"FCM_CREDENTIALS_FILE={path!r} is not a service-account key file")
    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[FCM_SCOPE])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"FCM_CREDENTIALS_FILE={path!r} is not a usable service-account key: {exc}") from None
    if not credentials.project_id:
        raise ValueError(f"FCM_CREDENTIALS_FILE={path!r} has no project_id: FCM v1 needs it in the URL")
    return credentials


class FcmClient:
    """Sends pushes to Android devices through FCM HTTP v1.

    One HTTP session (keep-alive) serves both the FCM endpoint and the OAuth
    token endpoint; the access token is cached until shortly before it expires.
    Safe to share between threads.
    """

    def __init__(self, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        if not settings.fcm_base_url.startswith(("https://", "http://")):
            raise ValueError(f"FCM_BASE_URL must be an http(s) URL, got {settings.fcm_base_url!r}")
        self._credentials = load_credentials(settings.fcm_credentials_file)
        self._timeout = timeout
        self._session = requests.Session()
        # No transport-level retries: a retried POST could double-deliver and
        # would swallow the Retry-After that the push task must honour.
        adapter = HTTPAdapter(max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        # google-auth's transport would otherwise wait up to 120 s for the token endpoint.
        self._token_transport = functools.partial(
            google.auth.transport.requests.Request(session=self._session), timeout=timeout)
        self._token_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._pyfcm = _PyfcmAtBaseUrl(settings.fcm_base_url, self._credentials)
        self.endpoint = self._pyfcm.fcm_end_point

    def send(self, request: PushRequest) -> PushOutcome:
        """Push one notification to one device; never raises for provider or network trouble."""
        device = device_label(request.token)
        payload = self._build_payload(request)
        started = time.monotonic()
        try:
            response = self._post(payload, fresh_token=False)
            if response.status_code == 401 and _fcm_error_code(response) != "THIRD_PARTY_AUTH_ERROR":
                log.info("fcm msg=%s device=%s: 401, refreshing the OAuth token and retrying once",
                         request.msg_id, device)
                response = self._post(payload, fresh_token=True)
        except google.auth.exceptions.RefreshError as exc:
            outcome = self._token_refused(exc)
        except (google.auth.exceptions.TransportError, requests.RequestException) as exc:
            outcome = TemporaryFailure(f"FCM unreachable: {type(exc).__name__}: {_first_line(exc)}")
        else:
            outcome = _classify(response, request.token)
        self._log_outcome(request.msg_id, device, outcome, time.monotonic() - started)
        return outcome

    def send_many(self, requests: list[PushRequest]) -> list[PushOutcome]:
        """`send` for each request, up to MAX_CONCURRENT_SENDS at once (threads sharing the session and
        the access token); one outcome per request, in order. Never raises for provider or network
        trouble."""
        if len(requests) <= 1:
            return [self.send(request) for request in requests]
        with self._token_lock:
            if self._pool is None or self._pool_pid != os.getpid():  # made after a fork, in the process using it
                self._pool = ThreadPoolExecutor(MAX_CONCURRENT_SENDS, thread_name_prefix="fcm")
                self._pool_pid = os.getpid()
            pool = self._pool
        return list(pool.map(self.send, requests))

    def close(self) -> None:
        """Close the pooled connections (and the sending threads)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
            self._pool = None
        self._session.close()

    def __enter__(self) -> "FcmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build_payload(self, request: PushRequest) -> bytes:
        if request.kind == BADGE_SYNC:  # a data message: the app sets the badge and cancels the tags itself
            return self._pyfcm.parse_payload(
                fcm_token=request.token,
                data_payload={"kind": BADGE_SYNC, "badge": str(max(0, request.badge)),
                              "withdraw": json.dumps([{"tag": c, "msg_id": m} for c, m in request.withdraw],
                                                     separators=(",", ":"))},
                android_config={"priority": "normal", "collapse_key": BADGE_SYNC, "ttl": "3600s"},
            )
        title, body = (request.title, request.body) if request.preview else (None, GENERIC_BODY)
        android_notification = {
            "tag": request.conversation_id,  # replaces the conversation's previous notification in the tray
            "notification_count": max(0, request.badge),
        }
        if request.sound:
            android_notification["sound"] = request.sound
        return self._pyfcm.parse_payload(
            fcm_token=request.token,
            notification_title=title,
            notification_body=body,
            data_payload={"msg_id": str(request.msg_id), "conversation_id": str(request.conversation_id)},
            android_config={
                "priority": "high" if request.priority >= HIGH_PRIORITY_FROM else "normal",
                # while the device is offline FCM keeps only the newest message per conversation
                "collapse_key": request.conversation_id,
                "notification": android_notification,
            },
        )

    def _post(self, payload: bytes, *, fresh_token: bool) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {self._access_token(force_refresh=fresh_token)}",
            "Content-Type": "application/json; charset=UTF-8",
        }
        return self._session.post(self.endpoint, data=payload, headers=headers, timeout=self._timeout)

    def _access_token(self, *, force_refresh: bool) -> str:
        # `valid` turns False a few minutes before expiry (google-auth's
        # REFRESH_THRESHOLD), so a cached token never expires mid-request.
        with self._token_lock:
            if force_refresh or not self._credentials.valid:
                self._credentials.refresh(self._token_transport)
                log.info("fcm: new OAuth access token for %s, valid until %s",
                         self._credentials.service_account_email, self._credentials.expiry)
            return self._credentials.token

    @staticmethod
    def _token_refused(exc: google.auth.exceptions.RefreshError) -> PushOutcome:
        reason = f"FCM OAuth token grant failed: {_first_line(exc)}"
        if getattr(exc, "retryable", False):
            return TemporaryFailure(reason)
        # The service account is revoked or misconfigured: retrying cannot fix it.
        return PermanentFailure(reason)

    @staticmethod
    def _log_outcome(msg_id: str, device: str, outcome: PushOutcome, elapsed: float) -> None:
        if isinstance(outcome, Delivered):
            log.info("fcm msg=%s device=%s: delivered as %s in %.0f ms", msg_id, device, outcome.provider_id,
                     elapsed * 1000)
        elif isinstance(outcome, TemporaryFailure):
            log.warning("fcm msg=%s device=%s: temporary failure (retry after %s): %s", msg_id, device,
                        outcome.retry_after, outcome.reason)
        elif isinstance(outcome, DeadToken):
            log.info("fcm msg=%s device=%s: dead token: %s", msg_id, device, outcome.reason)
        else:
            log.error("fcm msg=%s device=%s: permanent failure: %s", msg_id, device, outcome.reason)


def _classify(response: requests.Response, token: str) -> PushOutcome:
    """Map one FCM HTTP v1 reply to exactly one outcome."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            name = response.json().get("name")
        except (ValueError, AttributeError):
            name = None
        return Delivered(name)
    error = _fcm_error(response)
    code = error["errorCode"] or error["status"] or "no error code"
    reason = f"FCM {status} {code}: {error['message']}".replace(token, f"<token {device_label(token)}>")
    reason = reason[:MAX_REASON_CHARS]
    retry_after = retry_after_seconds(response.headers.get("Retry-After"), time.time())

    if error["errorCode"] == "UNREGISTERED" or status == 404:
        return DeadToken(reason)  # the app was uninstalled or the token expired
    if error["errorCode"] == "SENDER_ID_MISMATCH":
        return DeadToken(reason)  # the token belongs to another Firebase project: never ours to use
    if status == 400:
        return DeadToken(reason) if _names_the_token(error) else PermanentFailure(reason)
    if error["errorCode"] == "THIRD_PARTY_AUTH_ERROR":
        # Firebase's APNs / web-push credentials are wrong: an operator must fix the console.
        return PermanentFailure(reason)
    if status == 401:
        return TemporaryFailure(reason + " (after refreshing the OAuth token)", retry_after)
    if status == 429:
        return TemporaryFailure(reason, QUOTA_RETRY_AFTER_SECONDS if retry_after is None else retry_after)
    if status >= 500:
        return TemporaryFailure(reason, retry_after)
    return PermanentFailure(reason)


def _fcm_error(response: requests.Response) -> dict:
    """errorCode, status, message and BadRequest field violations of an FCM error reply."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    details = error.get("details") if isinstance(error.get("details"), list) else []
    error_code = next((d.get("errorCode") for d in details
                       if isinstance(d, dict) and d.get("@type", "").endswith("google.firebase.fcm.v1.FcmError")),
                      None)
    fields = [v.get("field", "") for d in details if isinstance(d, dict)
              for v in (d.get("fieldViolations") or []) if isinstance(v, dict)]
    return {
        "errorCode": error_code,
        "status": error.get("status"),
        "message": str(error.get("message") or response.reason or "")[:MAX_REASON_CHARS],
        "fields": fields,
    }


def _fcm_error_code(response: requests.Response) -> str | None:
    return _fcm_error(response)["errorCode"]


def _names_the_token(error: dict) -> bool:
    """An INVALID_ARGUMENT about the registration token itself (not about our message)."""
    return "registration token" in error["message"].lower() or "message.token" in error["fields"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:MAX_REASON_CHARS]
