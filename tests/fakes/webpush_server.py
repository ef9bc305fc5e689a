"""A local Web Push service (RFC 8030) that checks each push the way browsers' push services do.

HTTPS (a certificate signed by a throw-away CA made at start: `ca_file` is what
WEBPUSH_CA_FILE should point at). `new_subscription()` makes a subscription as a
browser would: a fresh P-256 key pair and 16-byte auth secret, whose private half
stays here, and an endpoint `https://127.0.0.1:<port>/push/<id>`. Every push is
checked: POST to a known endpoint; `Authorization: vapid t=<JWT>,k=<key>` with an
ES256 signature that verifies against k (and k the expected VAPID key when one
was given), aud = this service's origin, exp in the future and at most 24 h
ahead, sub a mailto: or https: URI (RFC 8292); TTL, Content-Encoding aes128gcm,
Urgency and Topic (RFC 8030 §5); a body of at most 4096 bytes that decrypts
(RFC 8291) with the subscription's keys to JSON. Refusals get the status a push
service answers (400, 401, 403, 404, 410, 413).

Tests read `deliveries` (accepted pushes: subscription id, headers, decrypted
payload) and `requests`, and script failures with `fail_next` and `unsubscribe`.

Run it by hand:  python -m tests.fakes.webpush_server --port 8445
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import re
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.apns_server import _write_tls_files

MAX_BODY_BYTES = 4096
MAX_EXP_AHEAD_SECONDS = 24 * 3600
URGENCIES = frozenset({"very-low", "low", "normal", "high"})
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PATH = re.compile(r"/push/(?P<id>[A-Za-z0-9_-]+)")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def write_vapid_key(path: str | Path) -> Path:
    """A fresh VAPID key (EC P-256, PKCS#8 PEM), readable by its owner only."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = Path(path)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@dataclass
class Subscription:
    """A browser's push subscription: what it sends to the server (`json()`) and the private keys
    it keeps to decrypt (here, the fake's)."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth_secret: bytes = field(repr=False)

    @property
    def p256dh(self) -> str:
        return b64(self.private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                              serialization.PublicFormat.UncompressedPoint))

    @property
    def auth(self) -> str:
        return b64(self.auth_secret)

    def json(self) -> dict:
        """PushSubscription.toJSON(), as a browser gives it."""
        return {"endpoint": self.endpoint, "expirationTime": None, "keys": {"p256dh": self.p256dh, "auth": self.auth}}


@dataclass(frozen=True)
class ReceivedPush:
    subscription_id: str
    headers: dict[str, str]  # lower-case names
    body_bytes: int
    status: int
    reason: str | None  # None when accepted
    payload: dict | None  # decrypted JSON (accepted pushes)
    vapid_claims: dict | None


class FakeWebPushServer:
    def __init__(self, vapid_public_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.vapid_public_key = vapid_public_key  # None: any key whose signature verifies
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._subscriptions: dict[str, Subscription] = {}
        self._gone: set[str] = set()
        self._next_failures: collections.deque = collections.deque()
        self._requests: list[ReceivedPush] = []
        self._dir: Path | None = None
        self._server: ThreadingHTTPServer | None = None
        self.ca_file: Path | None = None
        self.vapid_key_file: Path | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "FakeWebPushServer":
        self._dir = Path(tempfile.mkdtemp(prefix="webpush-fake-"))
        self.ca_file, cert_file, key_file = _write_tls_files(self._dir)
        if self.vapid_public_key is None:  # a key for NetherLink to sign with, and the one to expect
            self.vapid_key_file = write_vapid_key(self._dir / "vapid.pem")
            key = serialization.load_pem_private_key(self.vapid_key_file.read_bytes(), password=None)
            self.vapid_public_key = b64(key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(cert_file, key_file)
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="fake-webpush", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "FakeWebPushServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def env(self, subject: str = "mailto:ops@netherlink.test") -> dict[str, str]:
        """The settings that point NetherLink at this fake, signing with the fake's VAPID key."""
        env = {"WEBPUSH_CA_FILE": str(self.ca_file), "VAPID_SUBJECT": subject}
        if self.vapid_key_file is not None:
            env["VAPID_PRIVATE_KEY_FILE"] = str(self.vapid_key_file)
        return env

    # -- scripting and inspection ---------------------------------------------------------

    def new_subscription(self) -> Subscription:
        sub_id = secrets.token_urlsafe(24)
        sub = Subscription(sub_id, f"{self.url}/push/{sub_id}", ec.generate_private_key(ec.SECP256R1()),
                           secrets.token_bytes(16))
        with self._lock:
            self._subscriptions[sub_id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """The browser dropped it: pushes to it get 410 Gone from now on."""
        with self._lock:
            self._gone.add(sub.id)

    def fail_next(self, n: int = 1, status: int = 503, retry_after: int | str | None = None) -> None:
        with self._lock:
            self._next_failures.extend([(status, retry_after)] * n)

    @property
    def requests(self) -> list[ReceivedPush]:
        with self._lock:
            return list(self._requests)

    @property
    def deliveries(self) -> list[ReceivedPush]:
        return [r for r in self.requests if r.status == 201]

    def deliveries_to(self, sub: Subscription) -> list[ReceivedPush]:
        return [r for r in self.deliveries if r.subscription_id == sub.id]

    # -- judging a push -------------------------------------------------------------------

    def judge(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str | None, dict, ReceivedPush]:
        match = _PATH.fullmatch(urllib.parse.urlsplit(path).path)
        sub_id = match.group("id") if match else ""
        with self._lock:
            sub = self._subscriptions.get(sub_id)
            gone = sub_id in self._gone
            scripted = self._next_failures.popleft() if self._next_failures else None
        status, reason, reply_headers, payload, claims = 201, None, {}, None, None
        if scripted is not None:
            status, reason = scripted[0], "scripted failure"
            if scripted[1] is not None:
                reply_headers["Retry-After"] = str(scripted[1])
        elif sub is None:
            status, reason = 404, "no such subscription"
        elif gone:
            status, reason = 410, "subscription expired or unsubscribed"
        else:
            refusal, claims = self._vapid_refusal(headers.get("authorization", ""))
            if refusal is None:
                refusal = self._header_refusal(headers, body)
            if refusal is None:
                try:
                    plaintext = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth_secret,
                                                 version="aes128gcm")
                    payload = json.loads(plaintext)
                except Exception as exc:  # any decryption or JSON failure is the sender's fault
                    refusal = (400, f"payload does not decrypt to JSON with the subscription's keys: "
                                    f"{type(exc).__name__}")
            if refusal is not None:
                status, reason = refusal
                payload = None
            else:
                reply_headers["Location"] = f"{self.url}/message/{uuid.uuid4()}"
        record = ReceivedPush(sub_id, dict(headers), len(body), status, reason, payload, claims)
        with self._lock:
            self._requests.append(record)
        return status, reason, reply_headers, record

    def _vapid_refusal(self, authorization: str) -> tuple[tuple[int, str] | None, dict | None]:
        scheme, _, params = authorization.partition(" ")
        if scheme.lower() != "vapid":
            return (401, "missing VAPID authorization (RFC 8292)"), None
        parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        token, key = parts.get("t"), parts.get("k")
        if not token or not key:
            return (401, "VAPID authorization needs t= and k="), None
        if self.vapid_public_key is not None and key != self.vapid_public_key:
            return (403, "VAPID key is not the one the subscription was made with"), None
        try:
            point = unb64(key)
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, public_key, algorithms=["ES256"], audience=self.url,
                                options={"require": ["aud", "exp", "sub"]})
        except (ValueError, jwt.PyJWTError) as exc:
            return (403, f"VAPID JWT refused: {type(exc).__name__}: {exc}"), None
        if header.get("alg") != "ES256":
            return (403, "VAPID JWT must be ES256"), None
        if not isinstance(claims["exp"], int) or claims["exp"] > time.time() + MAX_EXP_AHEAD_SECONDS:
            return (403, "VAPID JWT exp more than 24 hours ahead"), claims
        if not str(claims["sub"]).startswith(("mailto:", "https://")):
            return (403, "VAPID sub must be a mailto: or https: URI"), claims
        return None, claims

    @staticmethod
    def _header_refusal(headers: dict[str, str], body: bytes) -> tuple[int, str] | None:
        if not re.fullmatch(r"\d{1,10}", headers.get("ttl", "")):
            return 400, "TTL header missing or not a number of seconds (RFC 8030 section 5.2)"
        if headers.get("content-encoding") != "aes128gcm":
            return 400, "Content-Encoding must be aes128gcm (RFC 8291)"
        if "urgency" in headers and headers["urgency"] not in URGENCIES:
            return 400, "Urgency must be very-low, low, normal or high"
        if "topic" in headers and not _TOPIC.fullmatch(headers["topic"]):
            return 400, "Topic must be at most 32 base64url characters"
        if not body:
            return 400, "empty body"
        if len(body) > MAX_BODY_BYTES:
            return 413, "payload too large"
        if len(body) < 21 + 65 or body[20] != 65:  # salt, rs, idlen, keyid: the sender's P-256 key
            return 400, "aes128gcm header must carry the sender's 65-byte public key"
        return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWebPushServer
    protocol_version = "HTTP/1.1"
    server_version = "FakeWebPush/1.0"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, reason, reply_headers, _ = self.fake.judge(self.path, headers, body)
        text = (reason or "").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        for name, value in reply_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args) -> None:  # the tests read `requests`; no stderr noise
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local Web Push service that checks VAPID and "
                                                 "decrypts what it is sent.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8445)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with FakeWebPushServer(host=args.host, port=args.port) as fake:
        print(f"fake Web Push service on {fake.url}")
        for name, value in fake.env().items():
            print(f"  export {name}={value}")
        print("subscriptions are made in-process (new_subscription()); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
