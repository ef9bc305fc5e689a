"""A real local FCM HTTP v1 server, with the OAuth2 token endpoint it needs.

It speaks the wire protocol the FCM provider speaks to Google:

- ``POST /token``: the OAuth2 JWT-bearer grant (RFC 7523). The assertion must
  be an RS256 JWT signed by the test service account's private key, issued by
  its ``client_email``, for this token endpoint, asking for the
  ``firebase.messaging`` scope. Answers ``{"access_token", "expires_in": 3600,
  "token_type": "Bearer"}`` or an OAuth error (``invalid_grant``...).
- ``POST /v1/projects/<project>/messages:send``: needs a Bearer token this
  server issued; validates the body like FCM (one target, known fields, data
  values that are strings, a registration token that looks like one, the 4 KB
  payload limit) and answers ``{"name": "projects/<p>/messages/<id>"}`` or
  FCM's error JSON with a ``google.firebase.fcm.v1.FcmError`` detail.

Tests script failures per device token (``fail_token``) or for the next N
sends (``fail_next``), revoke issued access tokens, delay replies, and assert
on ``messages`` (accepted messages) and ``token_grants``.

By hand::

    python -m tests.fakes.fcm_server --port 8444

prints the URL and the two environment variables that point NetherLink at it
(``FCM_BASE_URL`` and ``FCM_CREDENTIALS_FILE``, a service-account JSON it
writes).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import secrets
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs every service-account assertion for Google's canonical
# token endpoint, whatever token_uri says (Google accepts it as the audience
# at every token URL), so the fake accepts that audience as well as its own URL.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
ACCESS_TOKEN_LIFETIME = 3600
MAX_ASSERTION_LIFETIME = 3600
MAX_MESSAGE_BYTES = 4096
DEFAULT_PROJECT = "netherlink-test"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"

# FCM errorCode -> (HTTP status, google.rpc status, default message), as FCM answers them.
FCM_ERRORS = {
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE"}

# Real registration tokens are ~150+ characters of URL-safe base64 with a ':' separator.
REGISTRATION_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{8,}:[A-Za-z0-9_\-]{60,}$")
MESSAGE_FIELDS = {"name", "token", "topic", "condition", "data", "notification", "android", "webpush", "apns",
                  "fcm_options"}
NOTIFICATION_FIELDS = {"title", "body", "image"}
ANDROID_FIELDS = {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
                  "fcm_options", "direct_boot_ok"}
ANDROID_NOTIFICATION_FIELDS = {
    "title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key", "body_loc_args",
    "title_loc_key", "title_loc_args", "channel_id", "ticker", "sticky", "event_time", "local_only",
    "notification_priority", "default_sound", "default_vibrate_timings", "default_light_settings",
    "vibrate_timings", "visibility", "notification_count", "light_settings", "image", "bypass_proxy_notification",
}
ANDROID_PRIORITIES = {"normal", "high"}
RESERVED_DATA_KEYS = {"from", "gcm", "message_type", "notification"}


def make_device_token() -> str:
    """A fresh string shaped like a real FCM registration token."""
    return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(105)}"


def write_service_account(path: str | Path, token_uri: str, *, project_id: str = DEFAULT_PROJECT,
                          client_email: str | None = None) -> rsa.RSAPublicKey:
    """Write a service-account JSON with a fresh RSA key; return the public key that verifies it.

    token_uri decides where google-auth sends its JWT-bearer grant, so pointing
    it at a fake's /token keeps the whole OAuth exchange on 127.0.0.1.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    client_email = client_email or f"fcm-sender@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": client_email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    path = Path(path)
    path.write_text(json.dumps(info, indent=2))
    path.chmod(0o600)
    return key.public_key()


@dataclass
class ScriptedReply:
    """An error the fake answers instead of delivering."""

    status: int
    error_code: str | None = None
    message: str | None = None
    retry_after: str | None = None

    @classmethod
    def build(cls, error_code: str | None, status: int | None, message: str | None,
              retry_after: float | str | None) -> "ScriptedReply":
        if error_code is None and status is None:
            raise ValueError("script an error_code, a status, or both")
        if error_code is not None and error_code not in FCM_ERRORS:
            raise ValueError(f"unknown FCM errorCode {error_code!r}; known: {', '.join(FCM_ERRORS)}")
        if status is None:
            status = FCM_ERRORS[error_code][0]
        return cls(status, error_code, message, None if retry_after is None else str(retry_after))


@dataclass
class _State:
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (epoch seconds)
    token_grants: int = 0
    send_attempts: int = 0
    messages: list[dict] = field(default_factory=list)
    bearer_tokens_used: list[str] = field(default_factory=list)
    next_replies: list[ScriptedReply] = field(default_factory=list)
    token_replies: dict[str, ScriptedReply] = field(default_factory=dict)
    delays: list[float] = field(default_factory=list)


class FakeFcmServer:
    """FCM HTTP v1 + OAuth2 token endpoint on 127.0.0.1, for tests and local runs."""

    def __init__(self, *, port: int = 0, project_id: str = DEFAULT_PROJECT):
        self.project_id = project_id
        self._requested_port = port
        self._lock = threading.Lock()
        self._state = _State()
        self._public_keys: dict[str, rsa.RSAPublicKey] = {}  # client_email -> key
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> "FakeFcmServer":
        handler = type("FcmHandler", (_FcmHandler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._requested_port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-fcm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "FakeFcmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the fake FCM server is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """What FCM_BASE_URL should be."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    # credentials

    def write_service_account(self, path: str | Path, *, client_email: str | None = None) -> Path:
        """Write a service-account JSON this server trusts (token_uri = its /token)."""
        client_email = client_email or f"fcm-sender@{self.project_id}.iam.gserviceaccount.com"
        public_key = write_service_account(path, self.token_url, project_id=self.project_id,
                                           client_email=client_email)
        with self._lock:
            self._public_keys[client_email] = public_key
        return Path(path)

    # scripting

    def fail_next(self, count: int = 1, *, error_code: str | None = None, status: int | None = None,
                  message: str | None = None, retry_after: float | str | None = None) -> None:
        """Answer the next `count` sends (to any token) with this error."""
        reply = ScriptedReply.build(error_code, status, message, retry_after)
        with self._lock:
            self._state.next_replies.extend([reply] * count)

    def fail_token(self, token: str, *, error_code: str | None = None, status: int | None = None,
                   message: str | None = None, retry_after: float | str | None = None) -> None:
        """Answer every send to this device token with this error (UNREGISTERED: an uninstalled app)."""
        reply = ScriptedReply.build(error_code, status, message, retry_after)
        with self._lock:
            self._state.token_replies[token] = reply

    def delay_next(self, seconds: float, count: int = 1) -> None:
        """Hold the next `count` send replies for `seconds` (client timeouts)."""
        with self._lock:
            self._state.delays.extend([seconds] * count)

    def revoke_access_tokens(self) -> None:
        """Forget every issued access token, as if they had expired or been revoked."""
        with self._lock:
            self._state.access_tokens.clear()

    # observations

    @property
    def messages(self) -> list[dict]:
        """Accepted messages (the `message` object of each send), oldest first."""
        with self._lock:
            return [json.loads(json.dumps(m)) for m in self._state.messages]

    @property
    def token_grants(self) -> int:
        """How many access tokens /token issued."""
        with self._lock:
            return self._state.token_grants

    @property
    def send_attempts(self) -> int:
        """messages:send requests received, whatever their answer."""
        with self._lock:
            return self._state.send_attempts

    @property
    def bearer_tokens_used(self) -> list[str]:
        """The Bearer token of each authorized send, in order."""
        with self._lock:
            return list(self._state.bearer_tokens_used)

    # protocol, called from handler threads

    def grant_access_token(self, form: dict[str, list[str]]) -> tuple[int, dict]:
        grant_type = form.get("grant_type", [""])[0]
        assertion = form.get("assertion", [""])[0]
        if grant_type != JWT_BEARER_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant_type}"}
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: malformed assertion"}
        with self._lock:
            public_key = self._public_keys.get(unverified.get("iss", ""))
        if public_key is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        try:
            claims = jwt.decode(assertion, public_key, algorithms=["RS256"],
                                audience=[self.token_url, GOOGLE_TOKEN_AUDIENCE],
                                options={"require": ["iss", "aud", "iat", "exp"]})
        except jwt.InvalidSignatureError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        except jwt.PyJWTError as exc:
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
        if claims["exp"] - claims["iat"] > MAX_ASSERTION_LIFETIME:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: lifetime exceeds one hour"}
        if FCM_SCOPE not in claims.get("scope", "").split():
            return 400, {"error": "invalid_scope", "error_description": f"scope must include {FCM_SCOPE}"}
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._state.access_tokens[token] = time.time() + ACCESS_TOKEN_LIFETIME
            self._state.token_grants += 1
        return 200, {"access_token": token, "expires_in": ACCESS_TOKEN_LIFETIME, "token_type": "Bearer"}

    def send_message(self, project: str, authorization: str, raw_body: bytes) -> tuple[int, dict, dict]:
        """Answer one messages:send: (status, JSON body, extra headers)."""
        with self._lock:
            self._state.send_attempts += 1
            delay = self._state.delays.pop(0) if self._state.delays else 0.0
        if delay:
            time.sleep(delay)
        bearer = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        with self._lock:
            expiry = self._state.access_tokens.get(bearer)
        if expiry is None or expiry < time.time():
            return _error(401, None, "Request had invalid authentication credentials. Expected OAuth 2 access "
                                     "token, login cookie or other valid authentication credential.")
        if project != self.project_id:
            return _error(403, None, f"Permission 'cloudmessaging.messages.create' denied on resource "
                                     f"'//cloudresourcemanager.googleapis.com/projects/{project}'")
        try:
            body = json.loads(raw_body)
        except ValueError:
            return _error(400, None, "Invalid JSON payload received.")
        problem = _validate_send_body(body, len(raw_body))
        if problem is not None:
            return problem
        message = body["message"]
        token = message.get("token")
        with self._lock:
            reply = self._state.next_replies.pop(0) if self._state.next_replies else None
            reply = reply or self._state.token_replies.get(token)
        if reply is not None:
            return _error(reply.status, reply.error_code, reply.message, reply.retry_after)
        if body.get("validate_only"):
            return 200, {"name": f"projects/{self.project_id}/messages/fake_message_id"}, {}
        name = f"projects/{self.project_id}/messages/0:{int(time.time() * 1e6)}%{next(self._ids):016x}"
        with self._lock:
            self._state.messages.append(message)
            self._state.bearer_tokens_used.append(bearer)
        return 200, {"name": name}, {}


def _error(status: int, error_code: str | None, message: str | None, retry_after: str | None = None,
           bad_request_field: str | None = None) -> tuple[int, dict, dict]:
    """FCM's error JSON (google.rpc.Status plus FcmError / BadRequest details)."""
    status_name = FCM_ERRORS[error_code][1] if error_code else STATUS_NAMES.get(status, "UNKNOWN")
    message = message or (FCM_ERRORS[error_code][2] if error_code else status_name)
    details = []
    if error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if bad_request_field:
        details.append({"@type": BAD_REQUEST_TYPE,
                        "fieldViolations": [{"field": bad_request_field, "description": message}]})
    error = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = details
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return status, {"error": error}, headers


def _invalid(message: str, field_path: str) -> tuple[int, dict, dict]:
    return _error(400, "INVALID_ARGUMENT", message, bad_request_field=field_path)


def _unknown_fields(obj: dict, allowed: set[str], where: str) -> tuple[int, dict, dict] | None:
    for name in obj:
        if name not in allowed:
            return _invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                            f"Cannot find field.", where)
    return None


def _validate_send_body(body, size: int) -> tuple[int, dict, dict] | None:  # noqa: C901 - one check per FCM rule
    """None when FCM would accept the shape of this send request, else its 400."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return _invalid("Invalid JSON payload received. 'message' is required.", "message")
    problem = _unknown_fields(body, {"message", "validate_only"}, "")
    if problem:
        return problem
    message = body["message"]
    problem = _unknown_fields(message, MESSAGE_FIELDS, "message")
    if problem:
        return problem
    targets = [t for t in ("token", "topic", "condition") if message.get(t)]
    if len(targets) != 1:
        return _invalid("Exactly one of token, topic or condition must be specified.", "message")
    if "token" in message and not (isinstance(message["token"], str) and REGISTRATION_TOKEN.match(message["token"])):
        return _error(400, "INVALID_ARGUMENT", INVALID_TOKEN_MESSAGE, bad_request_field="message.token")
    data = message.get("data", {})
    if not isinstance(data, dict):
        return _invalid("Invalid value at 'message.data' (type.googleapis.com/google.protobuf.Map)", "message.data")
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return _invalid(f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {value!r}",
                            f"message.data[{i}].value")
        if key in RESERVED_DATA_KEYS or key.startswith(("google", "gcm")):
            return _invalid(f"Invalid data payload key: {key}", f"message.data[{i}].key")
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        return _invalid("Invalid value at 'message.notification'", "message.notification")
    problem = _unknown_fields(notification, NOTIFICATION_FIELDS, "message.notification")
    if problem:
        return problem
    for name, value in notification.items():
        if not isinstance(value, str):
            return _invalid(f"Invalid value at 'message.notification.{name}' (TYPE_STRING)",
                            f"message.notification.{name}")
    android = message.get("android", {})
    if not isinstance(android, dict):
        return _invalid("Invalid value at 'message.android'", "message.android")
    problem = _unknown_fields(android, ANDROID_FIELDS, "message.android")
    if problem:
        return problem
    if "priority" in android and str(android["priority"]).lower() not in ANDROID_PRIORITIES:
        return _invalid(f"Invalid value at 'message.android.priority' "
                        f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), "
                        f"\"{android['priority']}\"", "message.android.priority")
    if "collapse_key" in android and not isinstance(android["collapse_key"], str):
        return _invalid("Invalid value at 'message.android.collapse_key' (TYPE_STRING)", "message.android.collapse_key")
    android_notification = android.get("notification", {})
    if not isinstance(android_notification, dict):
        return _invalid("Invalid value at 'message.android.notification'", "message.android.notification")
    problem = _unknown_fields(android_notification, ANDROID_NOTIFICATION_FIELDS, "message.android.notification")
    if problem:
        return problem
    count = android_notification.get("notification_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        return _invalid("Invalid value at 'message.android.notification.notification_count' (TYPE_INT32)",
                        "message.android.notification.notification_count")
    if "ttl" in android and not (isinstance(android["ttl"], str) and re.fullmatch(r"\d{1,10}(\.\d{1,9})?s", android["ttl"])):
        return _invalid("Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)",
                        "message.android.ttl")
    if isinstance(data, dict) and data.get("kind") == "badge_sync":
        # NetherLink's silent badge sync must be a pure data message (the fake's own rule): a
        # notification block would make Android show something, and it must not wake the device.
        if message.get("notification") or android_notification:
            return _invalid("a badge_sync data message carries no notification", "message.notification")
        if str(android.get("priority", "normal")).lower() != "normal" or "badge" not in data:
            return _invalid("a badge_sync data message goes at normal priority with a badge", "message.android")
    if size > MAX_MESSAGE_BYTES:
        return _invalid("Message is too big", "message")
    return None


class _FcmHandler(BaseHTTPRequestHandler):
    fake: FakeFcmServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the real endpoint, so the client's session is reused
    server_version = "FakeFCM/1.0"
    # One write per reply and no Nagle: otherwise delayed ACKs add ~40 ms to every request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(self.path).path
        if path == "/token":
            form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
            status, body = self.fake.grant_access_token(form)
            self._reply(status, body)
            return
        match = self.SEND_PATH.match(path)
        if match is None:
            self._reply(404, {"error": {"code": 404, "message": f"Not found: {path}", "status": "NOT_FOUND"}})
            return
        status, body, headers = self.fake.send_message(match.group(1), self.headers.get("Authorization", ""), raw)
        self._reply(status, body, headers)

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence per-request stderr noise
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a fake FCM HTTP v1 server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8444)
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    parser.add_argument("--credentials", help="where to write the service-account JSON "
                                              "(default: a file in the temp directory)")
    args = parser.parse_args(argv)
    fake = FakeFcmServer(port=args.port, project_id=args.project).start()
    credentials = Path(args.credentials or Path(tempfile.gettempdir()) / f"netherlink-fake-fcm-{fake.port}.json")
    fake.write_service_account(credentials)
    print(f"fake FCM listening on {fake.url} (project {fake.project_id})")
    print(f"FCM_BASE_URL={fake.url}")
    print(f"FCM_CREDENTIALS_FILE={credentials}")
    print("device tokens must look real; generate one with tests.fakes.fcm_server.make_device_token(). Ctrl-C stops.",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
