"""Web Push (RFC 8030/8291/8292): browsers register a subscription, and offline messages reach it
encrypted and VAPID-signed, through a strict local push service that decrypts them."""
import base64
import os
import stat

import pytest
import requests
from sqlalchemy import select

from app.config import ConfigError, Settings
from app.push.providers import PermanentFailure, PushRequest
from app.push.providers.webpush import WebPushClient
from models import Device, PushLog
from tests.fakes.webpush_server import FakeWebPushServer, write_vapid_key
from tests.harness import wait_until


def auth(user):
    return {"Authorization": f"Bearer {user.token}"}


def register(cluster, user, subscription):
    return requests.post(f"{cluster.gw1.http}/api/devices", json={"platform": "webpush", "subscription": subscription},
                         headers=auth(user), timeout=10)


def rows(storage, user):
    with storage.sessions() as session:
        return session.scalars(select(PushLog).where(PushLog.user_id == int(user.user_id)).order_by(PushLog.id)).all()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_browser_registers_its_subscription_and_gets_the_servers_vapid_key(cluster, make_user, storage):
    bob = make_user()
    key = requests.get(f"{cluster.gw1.http}/api/push/vapid-public-key", timeout=10)
    assert key.status_code == 200 and key.json() == {"public_key": cluster.fakes.webpush.vapid_public_key}
    sub = cluster.fakes.webpush.new_subscription()
    r = register(cluster, bob, sub.json())
    assert r.status_code == 201 and r.json()["platform"] == "webpush" and r.json()["token"].startswith("webpush:")
    listed = requests.get(f"{cluster.gw1.http}/api/devices", headers=auth(bob), timeout=10).json()["devices"]
    assert [d["token"] for d in listed] == [r.json()["token"]]
    with storage.sessions() as session:
        device = session.scalar(select(Device).where(Device.user_id == int(bob.user_id)))
    assert device.subscription == {"endpoint": sub.endpoint, "p256dh": sub.p256dh, "auth": sub.auth}
    # Subscribing again (new keys for the same endpoint) keeps one device, with the new keys.
    again = sub.json() | {"keys": {"p256dh": sub.p256dh, "auth": b64(os.urandom(16))}}
    assert register(cluster, bob, again).json()["token"] == r.json()["token"]
    gone = requests.delete(f"{cluster.gw1.http}/api/devices/{r.json()['token']}", headers=auth(bob), timeout=10)
    assert gone.status_code == 204


@pytest.mark.parametrize("change, message", [
    (lambda s: s | {"endpoint": s["endpoint"].replace("https://", "http://")}, "'subscription.endpoint' must be an https URL"),
    (lambda s: s | {"endpoint": "https://"}, "'subscription.endpoint' must be an https URL"),
    (lambda s: s | {"endpoint": "https://push.test/" + "a" * 2100}, "'subscription.endpoint' must be an https URL of at most 2048"),
    (lambda s: s | {"keys": {"p256dh": s["keys"]["p256dh"][:-4], "auth": s["keys"]["auth"]}}, "'subscription.keys.p256dh' must be"),
    (lambda s: s | {"keys": {"p256dh": b64(b"\x05" + bytes(64)), "auth": s["keys"]["auth"]}}, "'subscription.keys.p256dh' must be"),
    (lambda s: s | {"expirationTime": "soon"}, "'subscription.expirationTime' must be null"),
    (lambda s: s | {"keys": {"p256dh": s["keys"]["p256dh"], "auth": b64(os.urandom(12))}}, "'subscription.keys.auth' must be base64url of 16 bytes"),
    (lambda s: s | {"keys": {"p256dh": s["keys"]["p256dh"]}}, "'subscription.keys' must be"),
    (lambda s: s | {"extra": 1}, "unknown subscription field(s) extra"),
    (lambda s: "not an object", "'subscription' must be the browser's PushSubscription JSON"),
])
def test_a_bad_subscription_is_a_clear_400(cluster, make_user, change, message):
    r = register(cluster, make_user(), change(cluster.fakes.webpush.new_subscription().json()))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert r.json()["message"].startswith(message), r.json()["message"]


def test_a_webpush_device_with_a_token_is_refused(cluster, make_user):
    r = requests.post(f"{cluster.gw1.http}/api/devices", json={"platform": "webpush", "token": "abc"},
                      headers=auth(make_user()), timeout=10)
    assert r.status_code == 400 and "'subscription'" in r.json()["message"]


def test_an_offline_message_reaches_the_browser_encrypted_and_vapid_signed(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    sub = cluster.fakes.webpush.new_subscription()
    assert register(cluster, bob, sub.json()).status_code == 201
    ack = connect(alice).send_message(bob.user_id, "dinner at eight?")
    wait_until(lambda: [r.push_status for r in rows(storage, bob)] == ["success"], timeout=15, what="the web push")
    [push] = cluster.fakes.webpush.deliveries_to(sub)
    assert push.payload == {"kind": "alert", "title": alice.username, "body": "dinner at eight?", "badge": 1,
                            "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"],
                            "tag": ack["conversation_id"]}
    assert push.vapid_claims["aud"] == cluster.fakes.webpush.url and push.vapid_claims["sub"].startswith("mailto:")
    assert push.headers["content-encoding"] == "aes128gcm" and push.headers["urgency"] == "high"
    assert push.headers["topic"] == ack["conversation_id"] and int(push.headers["ttl"]) > 0
    [row] = rows(storage, bob)
    assert row.push_type == "webpush" and row.provider_id


def test_a_gone_subscription_is_pruned(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    sub = cluster.fakes.webpush.new_subscription()
    assert register(cluster, bob, sub.json()).status_code == 201
    cluster.fakes.webpush.unsubscribe(sub)
    connect(alice).send_message(bob.user_id, "hello?")
    wait_until(lambda: [r.push_status for r in rows(storage, bob)] == ["failed"], timeout=15, what="the refusal")
    assert rows(storage, bob)[0].error_msg.startswith("dead token removed: HTTP 410")
    with storage.sessions() as session:
        assert session.scalars(select(Device).where(Device.user_id == int(bob.user_id))).all() == []


def test_a_throttled_push_is_retried_after_retry_after(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    sub = cluster.fakes.webpush.new_subscription()
    assert register(cluster, bob, sub.json()).status_code == 201
    cluster.fakes.webpush.fail_next(1, status=429, retry_after=1)
    connect(alice).send_message(bob.user_id, "ping")
    wait_until(lambda: [r.push_status for r in rows(storage, bob)] == ["success"], timeout=20, what="the retry")
    [row] = rows(storage, bob)
    assert row.attempts == 2
    tries = [r for r in cluster.fakes.webpush.requests if r.subscription_id in (sub.id, "")]
    assert [t.status for t in tries][-2:] == [429, 201]


def test_the_push_service_refuses_a_push_signed_with_another_vapid_key(tmp_path):
    """The fake is strict: a key other than the subscription's, or no VAPID at all, is refused."""
    with FakeWebPushServer() as fake:
        other = write_vapid_key(tmp_path / "other.pem")
        settings = Settings(vapid_private_key_file=str(other), vapid_subject="mailto:ops@netherlink.test",
                            webpush_ca_file=str(fake.ca_file))
        sub = fake.new_subscription()
        request = PushRequest(token="t", title="a", body="b", badge=1, conversation_id="p_1_2", msg_id="1",
                              subscription={"endpoint": sub.endpoint, "p256dh": sub.p256dh, "auth": sub.auth})
        client = WebPushClient(settings)
        try:
            [outcome] = client.send_many([request])
        finally:
            client.close()
        assert isinstance(outcome, PermanentFailure) and "HTTP 403" in outcome.reason
        assert fake.deliveries == []


def test_vapid_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="VAPID_PRIVATE_KEY_FILE is not set"):
        WebPushClient(Settings())
    key = write_vapid_key(tmp_path / "vapid.pem")
    with pytest.raises(ConfigError, match="VAPID_SUBJECT must be a mailto: or https: URI"):
        Settings.from_env({"VAPID_PRIVATE_KEY_FILE": str(key), "VAPID_SUBJECT": "ops@netherlink.test"})
    production = {"NETHERLINK_ENV": "production", "JWT_SECRET": "x" * 40, "DATABASE_URL": "mysql+pymysql://db/nl",
                  "FLOWER_BASIC_AUTH": "ops:secret", "VAPID_PRIVATE_KEY_FILE": str(key),
                  "VAPID_SUBJECT": "mailto:ops@netherlink.org"}
    Settings.from_env(production)  # owner-only key, real contact: fine
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="VAPID_PRIVATE_KEY_FILE must not be readable by group or others"):
        Settings.from_env(production)
    key.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(ConfigError, match="VAPID_SUBJECT must name a real contact"):
        Settings.from_env(production | {"VAPID_SUBJECT": "mailto:ops@example.com"})


def test_a_long_message_is_cut_to_fit_the_4096_bytes_a_push_service_takes():
    with FakeWebPushServer() as fake:
        env = fake.env()
        client = WebPushClient(Settings(vapid_private_key_file=env["VAPID_PRIVATE_KEY_FILE"],
                                        vapid_subject=env["VAPID_SUBJECT"], webpush_ca_file=env["WEBPUSH_CA_FILE"]))
        sub = fake.new_subscription()
        text = "ü" * 3000  # two bytes each: twice what fits
        request = PushRequest(token="t", title="alice", body=text, badge=1, conversation_id="p_1_2", msg_id="1",
                              subscription={"endpoint": sub.endpoint, "p256dh": sub.p256dh, "auth": sub.auth})
        try:
            client.send_many([request])
        finally:
            client.close()
        [push] = fake.deliveries_to(sub)
        assert push.body_bytes <= 4096 and push.payload["body"].endswith("\u2026")
        assert text.startswith(push.payload["body"][:-1]) and len(push.payload["body"]) > 1500
