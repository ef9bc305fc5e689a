"""A local APNs: HTTP/2 over TLS that checks each request the way Apple does.

It speaks only HTTP/2 (ALPN h2), with a certificate signed by a throw-away CA
made at start (`ca_file` is what APNS_CA_FILE should point at). It checks the
method and path, the ES256 provider token against the public half of the .p8
key it was given (kid, iss, signature, iat at most one hour old, no new token
on a connection within 20 minutes of the last), apns-topic, apns-push-type, apns-priority,
apns-expiration, apns-collapse-id and the payload, and answers Apple's status
and `{"reason": ...}` body when something is wrong.

Tests read `requests` (every request, with the answer given), `notifications`
(the accepted ones) and `connections_opened`, and script failures with
`fail_token`, `fail_next` and `delay_next`.

Run it by hand:  python -m tests.fakes.apns_server --port 8443
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import hashlib
import ipaddress
import json
import re
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
PROVIDER_TOKEN_MAX_AGE_SECONDS = 3600
PROVIDER_TOKEN_MIN_UPDATE_SECONDS = 20 * 60
PUSH_TYPES = frozenset({"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
                        "liveactivity", "pushtotalk", "widgets", "controls"})
DEFAULT_KEY_ID = "FAKEKEY123"
DEFAULT_TEAM_ID = "FAKETEAM12"
DEFAULT_TOPIC = "com.netherlink.app"

_PATH = re.compile(r"/3/device/(?P<token>[^/?#]*)")
_HEX_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]{64,200}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the fake answered: what came in and what went out."""

    method: str
    path: str
    token: str  # device token from the path ("" when the path had none)
    headers: dict[str, str]  # regular (non-pseudo) headers, lower-case names
    body: bytes
    status: int
    reason: str | None  # None when accepted
    apns_id: str
    connection: int  # 1-based number of the TLS connection that carried it

    @property
    def payload(self) -> dict | None:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def provider_token(self) -> str | None:
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class _ScriptedFailure:
    status: int
    reason: str
    retry_after: int | str | None = None


def write_p8_key(path: str | Path) -> Path:
    """Write a fresh EC P-256 private key as PKCS#8 PEM, the format of Apple's .p8 files."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = Path(path)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA certificate and a server certificate for 127.0.0.1/localhost signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "NetherLink APNs fake CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return ca_file, cert_file, key_file


class FakeApnsServer:
    """APNs on 127.0.0.1 in a background thread. `start()`/`stop()`, or use it as a context manager.

    `key_file` is the team's .p8 key (the fake keeps only its public half);
    when None, one is generated and `key_file` names it. `clock` is the
    fake's idea of now, for provider-token ages.
    """

    def __init__(self, key_file: str | Path | None = None, key_id: str = DEFAULT_KEY_ID,
                 team_id: str = DEFAULT_TEAM_ID, topic: str = DEFAULT_TOPIC, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.key_file = Path(key_file) if key_file is not None else None
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.host = host
        self.port = port
        self.clock = clock
        self.ca_file: Path | None = None
        self._public_key: ec.EllipticCurvePublicKey | None = None
        self._dir: Path | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._connections = 0
        self._token_failures: dict[str, _ScriptedFailure] = {}
        self._next_failures: collections.deque[_ScriptedFailure] = collections.deque()
        self._delays: collections.deque[float] = collections.deque()
        self._held = 0  # requests whose answer delay_next is holding right now
        # connection number -> (provider token in use, when it was first seen): Apple throttles
        # token changes on one connection, not separate connections each with their own token.
        self._connection_tokens: dict[int, tuple[str, float]] = {}
        self._handlers: set[asyncio.Task] = set()
        self._transports: set[asyncio.BaseTransport] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "FakeApnsServer":
        self._dir = Path(tempfile.mkdtemp(prefix="apns-fake-"))
        if self.key_file is None:
            self.key_file = write_p8_key(self._dir / f"AuthKey_{self.key_id}.p8")
        private_key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        self._public_key = private_key.public_key()
        self.ca_file, cert_file, server_key_file = _write_tls_files(self._dir)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(cert_file, server_key_file)
        tls.set_alpn_protocols(["h2"])
        self._thread = threading.Thread(target=self._run, args=(tls,), name="fake-apns", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._startup_error is not None:
            self._cleanup_files()
            raise self._startup_error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self._cleanup_files()

    def __enter__(self) -> "FakeApnsServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """APNS_* settings that point a NetherLink process at this fake."""
        return {"APNS_BASE_URL": self.url, "APNS_KEY_FILE": str(self.key_file), "APNS_KEY_ID": self.key_id,
                "APNS_TEAM_ID": self.team_id, "APNS_TOPIC": self.topic, "APNS_CA_FILE": str(self.ca_file)}

    # -- scripting and inspection (any thread) -------------------------------------------

    def fail_token(self, token: str, status: int = 410, reason: str = "Unregistered") -> None:
        """Answer every valid request for this device token with status/reason."""
        with self._lock:
            self._token_failures[token.lower()] = _ScriptedFailure(status, reason)

    def fail_next(self, n: int = 1, status: int = 503, reason: str = "ServiceUnavailable",
                  retry_after: int | str | None = None) -> None:
        """Answer the next n requests, whatever they hold, with status/reason (and Retry-After)."""
        with self._lock:
            self._next_failures.extend([_ScriptedFailure(status, reason, retry_after)] * n)

    def delay_next(self, n: int = 1, seconds: float = 1.0) -> None:
        """Hold the answers to the next n requests for `seconds` (to provoke client timeouts)."""
        with self._lock:
            self._delays.extend([seconds] * n)

    def reset(self) -> None:
        """Forget recorded requests and scripted failures."""
        with self._lock:
            self._requests.clear()
            self._token_failures.clear()
            self._next_failures.clear()
            self._delays.clear()

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def notifications(self) -> list[ReceivedRequest]:
        """The requests Apple would have delivered (answered 200)."""
        return [r for r in self.requests if r.status == 200]

    @property
    def held(self) -> int:
        """Requests received whose answers delay_next is holding back right now."""
        with self._lock:
            return self._held

    @property
    def connections_opened(self) -> int:
        """TLS connections accepted (with ALPN h2) since start."""
        with self._lock:
            return self._connections

    # -- server (event-loop thread) --------------------------------------------------------

    def _run(self, tls: ssl.SSLContext) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(tls))
        finally:
            loop.close()

    async def _serve(self, tls: ssl.SSLContext) -> None:
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle_connection, self.host, self.port, ssl=tls)
        except BaseException as exc:  # reported to start() in the calling thread
            self._startup_error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        # Dropping the transports ends each connection's read loop; cancelling the
        # handler tasks instead makes asyncio's stream callback log a CancelledError.
        for transport in list(self._transports):
            transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await server.wait_closed()

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        self._handlers.add(handler)
        self._transports.add(writer.transport)
        answers: set[asyncio.Task] = set()
        connection_number = 0
        try:
            tls = writer.get_extra_info("ssl_object")
            if tls is None or tls.selected_alpn_protocol() != "h2":
                return  # APNs speaks HTTP/2 only
            with self._lock:
                self._connections += 1
                connection_number = self._connections
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            streams: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    writer.write(conn.data_to_send())
                    break
                terminated = False
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = (list(event.headers), bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        if event.stream_id in streams:
                            streams[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
                        headers, body = streams.pop(event.stream_id)
                        task = asyncio.create_task(
                            self._answer(conn, writer, event.stream_id, headers, bytes(body), connection_number))
                        answers.add(task)
                        task.add_done_callback(answers.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        streams.pop(event.stream_id, None)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        terminated = True
                writer.write(conn.data_to_send())
                await writer.drain()
                if terminated:
                    break
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            for task in list(answers):
                task.cancel()
            writer.transport.abort()
            self._transports.discard(writer.transport)
            with self._lock:
                self._connection_tokens.pop(connection_number, None)
            self._handlers.discard(handler)

    async def _answer(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, stream_id: int,
                      headers: list[tuple[str, str]], body: bytes, connection_number: int) -> None:
        with self._lock:
            delay = self._delays.popleft() if self._delays else 0.0
        if delay:
            with self._lock:
                self._held += 1
            try:
                await asyncio.sleep(delay)
            finally:
                with self._lock:
                    self._held -= 1
        fields = dict(headers)
        apns_id = fields.get("apns-id") if _UUID.fullmatch(fields.get("apns-id", "")) else str(uuid.uuid4())
        status, reason, retry_after = self._judge(headers, body, connection_number)
        match = _PATH.fullmatch(fields.get(":path", ""))
        record = ReceivedRequest(
            method=fields.get(":method", ""), path=fields.get(":path", ""),
            token=match.group("token") if match else "",
            headers={k: v for k, v in headers if not k.startswith(":")}, body=body,
            status=status, reason=reason, apns_id=apns_id, connection=connection_number)
        with self._lock:
            self._requests.append(record)
        response = [(":status", str(status)), ("apns-id", apns_id)]
        if retry_after is not None:
            response.append(("retry-after", str(retry_after)))
        try:
            if reason is None:
                conn.send_headers(stream_id, response, end_stream=True)
            else:
                error = {"reason": reason}
                if status == 410:
                    error["timestamp"] = int(self.clock() * 1000)
                data = json.dumps(error).encode()
                conn.send_headers(stream_id, response + [("content-type", "application/json"),
                                                         ("content-length", str(len(data)))])
                conn.send_data(stream_id, data, end_stream=True)
        except h2.exceptions.H2Error:
            return  # the client reset the stream (gave up waiting) or closed the connection
        if not writer.is_closing():
            writer.write(conn.data_to_send())

    # -- Apple's checks ---------------------------------------------------------------------

    def _judge(self, headers: list[tuple[str, str]], body: bytes,
               connection: int) -> tuple[int, str | None, int | str | None]:
        """(status, reason or None when accepted, retry-after) for one request."""
        with self._lock:
            scripted = self._next_failures.popleft() if self._next_failures else None
        if scripted is not None:
            if scripted.status == 403 and scripted.reason in ("ExpiredProviderToken", "InvalidProviderToken"):
                self._refuse_provider_token(connection, scripted.reason)
            return scripted.status, scripted.reason, scripted.retry_after
        refusal = self._refusal(headers, body, connection)
        if refusal is not None:
            return refusal[0], refusal[1], None
        return 200, None, None

    def _refusal(self, headers: list[tuple[str, str]], body: bytes, connection: int) -> tuple[int, str] | None:
        fields = dict(headers)
        if fields.get(":method") != "POST":
            return 405, "MethodNotAllowed"
        match = _PATH.fullmatch(fields.get(":path", ""))
        if match is None:
            return 404, "BadPath"
        device_token = match.group("token")
        if not device_token:
            return 400, "MissingDeviceToken"
        names = [name for name, _ in headers if not name.startswith(":")]
        if len(names) != len(set(names)):
            return 400, "DuplicateHeaders"
        refusal = self._provider_token_refusal(fields.get("authorization"), connection)
        if refusal is not None:
            return refusal
        topic = fields.get("apns-topic")
        if not topic:
            return 400, "MissingTopic"
        if topic != self.topic:
            return 400, "TopicDisallowed"
        if fields.get("apns-push-type") not in PUSH_TYPES:
            return 400, "InvalidPushType"
        if fields.get("apns-priority", "10") not in ("1", "5", "10"):
            return 400, "BadPriority"
        if not re.fullmatch(r"\d{1,12}", fields.get("apns-expiration", "0")):
            return 400, "BadExpirationDate"
        if "apns-id" in fields and not _UUID.fullmatch(fields["apns-id"]):
            return 400, "BadMessageId"
        if len(fields.get("apns-collapse-id", "").encode()) > MAX_COLLAPSE_ID_BYTES:
            return 400, "BadCollapseId"
        if not _HEX_DEVICE_TOKEN.fullmatch(device_token):
            return 400, "BadDeviceToken"
        if not body:
            return 400, "PayloadEmpty"
        if len(body) > MAX_PAYLOAD_BYTES:
            return 413, "PayloadTooLarge"
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return 400, "BadPayload"  # Apple documents no reason for malformed JSON; this one is the fake's
        aps = payload["aps"]
        if fields.get("apns-push-type") == "background":
            # Apple: a background push has priority 5 (10 is an error) and content-available 1, and
            # shows nothing: no alert, no sound (the fake's reasons; Apple only drops such pushes).
            if fields.get("apns-priority") != "5":
                return 400, "BadPriority"
            if aps.get("content-available") != 1 or "alert" in aps or "sound" in aps:
                return 400, "BadBackgroundPayload"
        elif fields.get("apns-push-type") == "alert" and not aps.get("alert"):
            return 400, "MissingAlert"
        with self._lock:
            scripted = self._token_failures.get(device_token.lower())
        if scripted is not None:
            return scripted.status, scripted.reason
        return None

    def _provider_token_refusal(self, authorization: str | None, connection: int) -> tuple[int, str] | None:
        if not authorization:
            return 403, "MissingProviderToken"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 403, "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self._public_key, algorithms=["ES256"],
                                options={"verify_iat": False, "verify_exp": False, "verify_nbf": False})
        except jwt.InvalidTokenError:
            return self._refuse_provider_token(connection, "InvalidProviderToken")
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return self._refuse_provider_token(connection, "InvalidProviderToken")
        iat = claims.get("iat")
        if not isinstance(iat, int):
            return self._refuse_provider_token(connection, "InvalidProviderToken")
        now = self.clock()
        if now - iat > PROVIDER_TOKEN_MAX_AGE_SECONDS:
            return self._refuse_provider_token(connection, "ExpiredProviderToken")
        with self._lock:
            current = self._connection_tokens.get(connection)
            if current is None or token != current[0]:
                if current is not None and now - current[1] < PROVIDER_TOKEN_MIN_UPDATE_SECONDS:
                    return 429, "TooManyProviderTokenUpdates"
                self._connection_tokens[connection] = (token, now)
        return None

    def _refuse_provider_token(self, connection: int, reason: str) -> tuple[int, str]:
        # After telling the provider its token is bad, a new one right away is no abuse.
        with self._lock:
            self._connection_tokens.pop(connection, None)
        return 403, reason

    def _cleanup_files(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local APNs (HTTP/2 over TLS) that checks requests like "
                                                 "Apple and logs what it accepts.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--key-file", help="the .p8 key NetherLink signs with (default: generate one)")
    parser.add_argument("--key-id", default=DEFAULT_KEY_ID)
    parser.add_argument("--team-id", default=DEFAULT_TEAM_ID)
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    args = parser.parse_args(argv)
    fake = FakeApnsServer(key_file=args.key_file, key_id=args.key_id, team_id=args.team_id, topic=args.topic,
                          host=args.host, port=args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` cleans up like Ctrl-C
    with fake:
        print(f"fake APNs listening on {fake.url}")
        print(f"CA certificate: {fake.ca_file}")
        print("point NetherLink at it with:")
        for name, value in fake.env().items():
            print(f"  export {name}={value}")
        print("Ctrl-C to stop", flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.2)
                requests = fake.requests
                for request in requests[seen:]:
                    device = hashlib.sha256(request.token.encode()).hexdigest()[:12]
                    print(f"{request.status} {request.reason or 'accepted'} device={device} "
                          f"push-type={request.headers.get('apns-push-type')} bytes={len(request.body)}", flush=True)
                seen = len(requests)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
