"""ApnsClient against a real local HTTP/2 APNs (tests/fakes/apns_server.py): no mocks."""
from __future__ import annotations

import email.utils
import json
import logging
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from app.config import Settings
from app.push.providers import DeadToken, Delivered, PermanentFailure, PushRequest, TemporaryFailure, device_label
from app.push.providers.apns import ApnsClient
from tests.fakes.apns_server import FakeApnsServer, write_p8_key

KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM456XYZ"
TOPIC = "com.netherlink.ios"
DEVICE = "a1" * 32  # 64 hex characters, like a real device token


class Clock:
    """A clock both the client and the fake read, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def p8_key(tmp_path_factory) -> Path:
    return write_p8_key(tmp_path_factory.mktemp("apns") / f"AuthKey_{KEY_ID}.p8")


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time())))


@pytest.fixture
def fake(p8_key, clock):
    with FakeApnsServer(key_file=p8_key, key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC, clock=clock) as server:
        yield server


def settings_for(fake: FakeApnsServer, **overrides) -> Settings:
    values = {name.lower(): value for name, value in fake.env().items()}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(fake, clock):
    with ApnsClient.from_settings(settings_for(fake), clock=clock) as apns:
        yield apns


def push(token: str = DEVICE, **fields) -> PushRequest:
    values = dict(token=token, title="Alice", body="see you at 8?", badge=3, conversation_id="p:17:42",
                  msg_id="7193847561234567890", priority=8)
    values.update(fields)
    return PushRequest(**values)


def provider_tokens(fake: FakeApnsServer) -> list[str]:
    return [r.provider_token for r in fake.requests]


# -- delivered ---------------------------------------------------------------------------------


def test_private_message_push_is_delivered_with_apple_headers_and_payload(client, fake, clock, p8_key):
    outcome = client.send(push())

    assert [n.token for n in fake.notifications] == [DEVICE]
    received = fake.notifications[0]
    assert outcome == Delivered(received.apns_id)
    assert received.headers["apns-topic"] == TOPIC
    assert received.headers["apns-push-type"] == "alert"
    assert received.headers["apns-priority"] == "10"
    assert received.headers["apns-collapse-id"] == "p:17:42"
    assert received.headers["apns-expiration"] == str(int(clock.now) + 86400)
    assert received.payload == {
        "aps": {"alert": {"title": "Alice", "body": "see you at 8?"}, "badge": 3, "sound": "default",
                "thread-id": "p:17:42", "mutable-content": 1},
        "msg_id": "7193847561234567890",
        "conversation_id": "p:17:42",
    }
    token = received.provider_token
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY_ID}
    public_key = serialization.load_pem_private_key(p8_key.read_bytes(), password=None).public_key()
    claims = jwt.decode(token, public_key, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": TEAM_ID, "iat": int(clock.now)}


@pytest.mark.parametrize("priority, apns_priority", [(8, "10"), (10, "10"), (5, "5"), (1, "5")])
def test_group_and_digest_pushes_go_at_apple_priority_5(client, fake, priority, apns_priority):
    assert isinstance(client.send(push(priority=priority)), Delivered)
    assert fake.notifications[0].headers["apns-priority"] == apns_priority


def test_preview_off_shows_a_generic_alert_without_the_message_text(client, fake):
    outcome = client.send(push(title="Alice", body="the door code is 4711", preview=False))

    assert isinstance(outcome, Delivered)
    received = fake.notifications[0]
    assert received.payload["aps"]["alert"] == {"body": "New message"}
    assert received.payload["aps"]["badge"] == 3
    assert b"4711" not in received.body and b"Alice" not in received.body


def test_long_conversation_id_still_collapses_within_64_bytes(client, fake):
    conversation_id = "g:" + "9" * 80
    assert isinstance(client.send(push(conversation_id=conversation_id)), Delivered)
    received = fake.notifications[0]
    assert len(received.headers["apns-collapse-id"].encode()) == 64
    assert received.payload["aps"]["thread-id"] == conversation_id
    client.send(push(conversation_id=conversation_id, msg_id="2"))
    assert fake.notifications[1].headers["apns-collapse-id"] == received.headers["apns-collapse-id"]


def test_oversize_body_is_truncated_to_fit_4096_bytes_not_refused(client, fake):
    text = 'ü"\n' * 3000 + "THE END"  # multi-byte and JSON-escaped characters, ~18 KB encoded

    outcome = client.send(push(body=text))

    assert isinstance(outcome, Delivered)
    received = fake.notifications[0]
    assert 4000 < len(received.body) <= 4096
    body = received.payload["aps"]["alert"]["body"]
    assert body.endswith("\u2026") and text.startswith(body[:-1].rstrip())
    assert received.payload["aps"]["alert"]["title"] == "Alice"


# -- dead tokens, temporary and permanent failures ---------------------------------------------------


def test_unregistered_device_token_is_dead(client, fake):
    fake.fail_token(DEVICE, status=410, reason="Unregistered")
    assert client.send(push()) == DeadToken("Unregistered")


@pytest.mark.parametrize("script, token, reason", [
    (None, "ab" * 16, "BadDeviceToken"),  # the fake itself refuses a malformed token
    ((400, "BadDeviceToken"), DEVICE, "BadDeviceToken"),
    ((400, "DeviceTokenNotForTopic"), DEVICE, "DeviceTokenNotForTopic"),
])
def test_bad_device_token_is_dead(client, fake, script, token, reason):
    if script:
        fake.fail_token(token, status=script[0], reason=script[1])
    assert client.send(push(token=token)) == DeadToken(reason)
    assert len(fake.requests) == 1


def test_token_that_is_not_hex_is_dead_without_asking_apple(client, fake):
    assert client.send(push(token="../../admin?x=1")) == DeadToken("BadDeviceToken")
    assert fake.requests == []


@pytest.mark.parametrize("status, reason, retry_after, expected", [
    (503, "ServiceUnavailable", 7, 7.0),
    (503, "Shutdown", "http-date+120", 120.0),
    (500, "InternalServerError", None, None),
    (429, "TooManyRequests", 2, 2.0),
])
def test_overloaded_apple_is_a_temporary_failure_carrying_retry_after(client, fake, clock, status, reason,
                                                                     retry_after, expected):
    if retry_after == "http-date+120":
        retry_after = email.utils.formatdate(clock.now + 120, usegmt=True)
    fake.fail_next(1, status=status, reason=reason, retry_after=retry_after)

    assert client.send(push()) == TemporaryFailure(reason, expected)
    assert isinstance(client.send(push()), Delivered)


def test_other_bad_request_is_a_permanent_failure(fake, clock):
    with ApnsClient(settings_for(fake, apns_topic="com.someone.else"), clock=clock) as wrong_topic:
        assert wrong_topic.send(push()) == PermanentFailure("TopicDisallowed")


def test_scripted_bad_request_reason_is_reported(client, fake):
    fake.fail_token(DEVICE, status=400, reason="BadExpirationDate")
    assert client.send(push()) == PermanentFailure("BadExpirationDate")


def test_connection_refused_is_a_temporary_failure(fake, clock):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with ApnsClient(settings_for(fake, apns_base_url=f"https://127.0.0.1:{port}"), clock=clock) as apns:
        outcome = apns.send(push())
    assert isinstance(outcome, TemporaryFailure)
    assert "ConnectError" in outcome.reason
    assert DEVICE not in outcome.reason


def test_slow_apple_is_a_temporary_failure_and_the_next_push_goes_through(fake, clock):
    fake.delay_next(1, seconds=1.0)
    with ApnsClient(settings_for(fake), clock=clock, timeout=0.3) as apns:
        outcome = apns.send(push())
        assert isinstance(outcome, TemporaryFailure) and outcome.reason.startswith("timeout")
        assert isinstance(apns.send(push(msg_id="2")), Delivered)


def test_untrusted_certificate_is_a_temporary_failure(fake, clock):
    with ApnsClient(settings_for(fake, apns_ca_file=""), clock=clock) as apns:
        outcome = apns.send(push())
    assert isinstance(outcome, TemporaryFailure) and "CERTIFICATE_VERIFY_FAILED" in outcome.reason
    assert fake.requests == []


# -- provider token and connection reuse --------------------------------------------------------------


def test_one_provider_token_and_one_http2_connection_carry_many_pushes(client, fake):
    outcomes = [client.send(push(msg_id=str(i), badge=i)) for i in range(20)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes += list(pool.map(lambda i: client.send(push(msg_id=str(i))), range(20, 40)))

    assert all(isinstance(o, Delivered) for o in outcomes)
    assert len(fake.notifications) == 40
    assert len(set(provider_tokens(fake))) == 1
    assert fake.connections_opened == 1


def test_send_many_sends_a_batch_as_concurrent_streams_of_one_connection(client, fake):
    fake.delay_next(20, seconds=0.5)  # one after the other, 20 answers held 0.5 s each would take 10 s
    started = time.monotonic()
    outcomes = client.send_many([push(token=f"{i:02x}" * 32, msg_id=str(i)) for i in range(20)])
    took = time.monotonic() - started

    assert took < 4, f"the batch took {took:.1f} s: its requests were not concurrent"
    assert all(isinstance(o, Delivered) for o in outcomes)
    by_token = {r.token: r.apns_id for r in fake.notifications}
    assert [o.provider_id for o in outcomes] == [by_token[f"{i:02x}" * 32] for i in range(20)]  # in order
    assert fake.connections_opened == 1 and len(set(provider_tokens(fake))) == 1


def test_send_many_gives_each_request_its_own_outcome(client, fake, clock):
    dead, busy, wrong = "d0" * 32, "b0" * 32, "e0" * 32
    fake.fail_token(dead, 410, "Unregistered")
    fake.fail_token(busy, 503, "ServiceUnavailable")
    fake.fail_token(wrong, 400, "BadExpirationDate")
    outcomes = client.send_many([push(), push(token=dead), push(token="not-hex"), push(token=busy, preview=False),
                                 push(token=wrong), push(body="x" * 10_000)])

    assert [type(o) for o in outcomes] == [Delivered, DeadToken, DeadToken, TemporaryFailure, PermanentFailure,
                                           Delivered]
    assert outcomes[1] == DeadToken("Unregistered") and outcomes[2] == DeadToken("BadDeviceToken")
    assert outcomes[3] == TemporaryFailure("ServiceUnavailable", None)
    assert outcomes[4] == PermanentFailure("BadExpirationDate")
    assert len(fake.requests) == 5  # the non-hex token never left the client
    assert client.send_many([]) == []


def test_provider_token_is_renewed_after_50_minutes(client, fake, clock):
    client.send(push(msg_id="1"))
    clock.advance(49 * 60)
    client.send(push(msg_id="2"))
    clock.advance(60 + 1)
    client.send(push(msg_id="3"))

    first, second, third = provider_tokens(fake)
    assert first == second != third
    assert jwt.decode(third, options={"verify_signature": False})["iat"] == int(clock.now)
    assert len(fake.notifications) == 3  # Apple neither expired nor throttled any of them
    assert fake.connections_opened == 1


def test_wrong_key_is_refused_and_renewed_once_not_on_every_push(fake, clock, tmp_path):
    other_key = write_p8_key(tmp_path / "AuthKey_other.p8")
    with ApnsClient(settings_for(fake, apns_key_file=str(other_key)), clock=clock) as apns:
        outcomes = [apns.send(push(msg_id=str(i))) for i in range(4)]

    assert outcomes == [TemporaryFailure("InvalidProviderToken")] * 4
    assert [r.reason for r in fake.requests] == ["InvalidProviderToken"] * 4
    assert len(set(provider_tokens(fake))) == 2  # the first token, then one refresh attempt
    assert fake.notifications == []


def test_expired_provider_token_is_replaced_for_the_next_push(client, fake, clock):
    fake.clock = lambda: clock.now + 3601  # Apple sees the cached token as over an hour old
    assert client.send(push(msg_id="1")) == TemporaryFailure("ExpiredProviderToken")
    fake.clock = clock
    clock.advance(1)

    assert isinstance(client.send(push(msg_id="2")), Delivered)
    refused, accepted = provider_tokens(fake)
    assert refused != accepted


def test_refused_token_renewal_does_not_trip_apple_throttle(client, fake):
    client.send(push(msg_id="1"))
    fake.fail_next(1, status=403, reason="ExpiredProviderToken")
    assert client.send(push(msg_id="2")) == TemporaryFailure("ExpiredProviderToken")
    assert isinstance(client.send(push(msg_id="3")), Delivered)
    assert len(set(provider_tokens(fake))) == 2


# -- configuration and logging ------------------------------------------------------------------------


@pytest.mark.parametrize("setting, env_name", [
    ("apns_key_file", "APNS_KEY_FILE"), ("apns_key_id", "APNS_KEY_ID"),
    ("apns_team_id", "APNS_TEAM_ID"), ("apns_topic", "APNS_TOPIC"),
])
def test_client_refuses_missing_setting_by_name(p8_key, setting, env_name):
    values = dict(apns_key_file=str(p8_key), apns_key_id=KEY_ID, apns_team_id=TEAM_ID, apns_topic=TOPIC)
    values[setting] = ""
    with pytest.raises(ValueError, match=env_name):
        ApnsClient.from_settings(Settings(**values))


def test_client_refuses_unreadable_or_wrong_key_file(tmp_path):
    common = dict(apns_key_id=KEY_ID, apns_team_id=TEAM_ID, apns_topic=TOPIC)
    with pytest.raises(ValueError, match="APNS_KEY_FILE"):
        ApnsClient.from_settings(Settings(apns_key_file=str(tmp_path / "missing.p8"), **common))
    (tmp_path / "junk.p8").write_text("not a key")
    with pytest.raises(ValueError, match="APNS_KEY_FILE"):
        ApnsClient.from_settings(Settings(apns_key_file=str(tmp_path / "junk.p8"), **common))


def test_logs_name_devices_by_hash_never_by_token_or_text(client, fake, caplog):
    caplog.set_level(logging.INFO)  # every logger, httpx's request line included
    caplog.set_level(logging.DEBUG, logger="app")
    client.send(push(body="secret plans"))
    fake.fail_token(DEVICE, status=410, reason="Unregistered")
    client.send(push(body="secret plans"))

    assert device_label(DEVICE) in caplog.text
    assert DEVICE not in caplog.text
    assert "secret plans" not in caplog.text


# -- the fake answers like Apple -------------------------------------------------------------------------


@pytest.mark.parametrize("change, status, reason", [
    ({"method": "GET"}, 405, "MethodNotAllowed"),
    ({"path": "/3/devices/" + DEVICE}, 404, "BadPath"),
    ({"drop": "authorization"}, 403, "MissingProviderToken"),
    ({"drop": "apns-topic"}, 400, "MissingTopic"),
    ({"drop": "apns-push-type"}, 400, "InvalidPushType"),
    ({"headers": {"apns-priority": "7"}}, 400, "BadPriority"),
    ({"headers": {"apns-collapse-id": "c" * 65}}, 400, "BadCollapseId"),
    ({"body": b""}, 400, "PayloadEmpty"),
    ({"body": json.dumps({"aps": {"alert": "x" * 5000}}).encode()}, 413, "PayloadTooLarge"),
    ({"iat_age": 3601}, 403, "ExpiredProviderToken"),
])
def test_fake_refuses_what_apple_refuses(fake, clock, p8_key, change, status, reason):
    iat = int(clock.now) - change.get("iat_age", 0)
    token = jwt.encode({"iss": TEAM_ID, "iat": iat}, p8_key.read_bytes(), algorithm="ES256", headers={"kid": KEY_ID})
    headers = {"authorization": f"bearer {token}", "apns-topic": TOPIC, "apns-push-type": "alert"}
    headers.update(change.get("headers", {}))
    headers.pop(change.get("drop", ""), None)
    body = change.get("body", b'{"aps":{"alert":"hi"}}')
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(fake.ca_file))) as http:
        response = http.request(change.get("method", "POST"), fake.url + change.get("path", "/3/device/" + DEVICE),
                                headers=headers, content=body)
    assert response.http_version == "HTTP/2"
    assert (response.status_code, response.json()["reason"]) == (status, reason)
    assert fake.notifications == []


def test_fake_throttles_token_changes_per_connection_like_apple(fake, clock, p8_key):
    def bearer(iat: int) -> dict[str, str]:
        token = jwt.encode({"iss": TEAM_ID, "iat": iat}, p8_key.read_bytes(), algorithm="ES256",
                           headers={"kid": KEY_ID})
        return {"authorization": f"bearer {token}", "apns-topic": TOPIC, "apns-push-type": "alert"}

    body = b'{"aps":{"alert":"hi"}}'
    url = fake.url + "/3/device/" + DEVICE
    verify = ssl.create_default_context(cafile=str(fake.ca_file))
    with httpx.Client(http2=True, verify=verify) as one, httpx.Client(http2=True, verify=verify) as other:
        assert one.post(url, headers=bearer(int(clock.now)), content=body).status_code == 200
        assert other.post(url, headers=bearer(int(clock.now) - 5), content=body).status_code == 200
        swapped = one.post(url, headers=bearer(int(clock.now) - 10), content=body)
    assert (swapped.status_code, swapped.json()["reason"]) == (429, "TooManyProviderTokenUpdates")
    assert fake.connections_opened == 2
