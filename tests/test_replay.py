"""Anti-replay: frames carrying the client's clock are refused when too far
from server time; with FRAME_SIGNING every send is HMAC-signed with a key
issued in hello."""
import base64
import hashlib
import hmac
import time

import pytest

from tests.harness import Gateway
from ws.frames import signing_payload


@pytest.fixture(scope="module")
def signing(services, log_dir, cluster):
    gw = Gateway("gwsign", services, log_dir, FRAME_SIGNING="true",
                 FRAME_MAX_CLOCK_SKEW_SECONDS="60")
    yield gw
    gw.stop()


def now_ms():
    return int(time.time() * 1000)


def signed(key: bytes, frame: dict) -> dict:
    return {**frame, "sig": hmac.new(key, signing_payload(frame), hashlib.sha256).hexdigest()}


def answer(client, cmid):
    return client.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"))


def test_a_frame_far_from_server_time_is_refused_and_the_connection_stays(cluster, make_user, connect):
    client = connect(make_user())
    client.send_json({"type": "ping", "ts": now_ms() - 10 * 60 * 1000})
    err = client.next_frame(lambda f: f["type"] == "error")
    assert err["code"] == "invalid_frame" and "check the device clock" in err["message"]
    client.send_json({"type": "ping", "ts": now_ms()})
    assert client.next_frame(lambda f: f["type"] == "pong")


def test_signed_sends_are_verified(signing, make_user, connect):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, signing), connect(bob, signing)
    key = base64.b64decode(a.hello["signing_key"])
    assert len(key) == 32 and a.hello["signing_key"] != b.hello["signing_key"]  # one key per connection

    frame = {"type": "send", "client_msg_id": "s-1", "to": bob.user_id, "content": "signed 🔏", "ts": now_ms()}
    a.send_json(signed(key, frame))
    ack = answer(a, "s-1")
    assert ack["type"] == "ack" and b.wait_message(ack["msg_id"])["content"] == "signed 🔏"

    cases = [
        ({"type": "send", "client_msg_id": "s-2", "to": bob.user_id, "content": "no sig", "ts": now_ms()},
         "unauthorized"),
        ({**signed(key, {**frame, "client_msg_id": "s-3"}), "content": "tampered"}, "unauthorized"),
        (signed(b"\0" * 32, {**frame, "client_msg_id": "s-4"}), "unauthorized"),
        (signed(key, {**frame, "client_msg_id": "s-5", "ts": now_ms() - 5 * 60 * 1000}), "invalid_frame"),
        (signed(key, {k: v for k, v in {**frame, "client_msg_id": "s-6"}.items() if k != "ts"}), "invalid_frame"),
    ]
    for bad, code in cases:
        a.send_json(bad)
        err = answer(a, bad["client_msg_id"])
        assert (err["type"], err["code"]) == ("error", code), (bad, err)
    # A replay of the first frame (same connection, within the window) is the idempotent retry: same msg_id.
    a.send_json(signed(key, frame))
    assert answer(a, "s-1")["msg_id"] == ack["msg_id"]
    b.drain(quiet=0.3)
    assert [m["content"] for m in b.messages()] == ["signed 🔏"]
