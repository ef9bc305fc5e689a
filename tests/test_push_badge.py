"""Badge sync and notification withdrawal: after a read on any device, or a recall, the user's
devices that show a notification get one silent push with the new badge and what to remove."""
import json
import secrets
import time

import httpx
import jwt
import pytest
import requests
from sqlalchemy import select

from app.push.badges import BADGE_SYNC_KEY, SHOWN_KEY
from models import Device, PushLog
from tests.fakes.fcm_server import make_device_token as fcm_token
from tests.harness import wait_until


def add_device(storage, user, platform):
    token = secrets.token_hex(32) if platform == "ios" else fcm_token()
    with storage.session() as session:
        session.add(Device(user_id=int(user.user_id), platform=platform, token=token))
    return token


def add_webpush_device(cluster, user):
    sub = cluster.fakes.webpush.new_subscription()
    r = requests.post(f"{cluster.gw1.http}/api/devices", json={"platform": "webpush", "subscription": sub.json()},
                      headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    assert r.status_code == 201, r.text
    return sub


def rows(storage, user):
    with storage.sessions() as session:
        return session.scalars(select(PushLog).where(PushLog.user_id == int(user.user_id)).order_by(PushLog.id)).all()


def badge_rows(storage, user):
    return [r for r in rows(storage, user) if r.target.startswith("badge:")]


def background_pushes(fakes, token):
    return [r for r in fakes.apns.notifications if r.token == token and r.headers["apns-push-type"] == "background"]


def fcm_syncs(fakes, token):
    return [m for m in fakes.fcm.messages if m["token"] == token and m.get("data", {}).get("kind") == "badge_sync"]


def webpush_syncs(fakes, sub):
    return [d for d in fakes.webpush.deliveries_to(sub) if d.payload["kind"] == "badge_sync"]


def pushed_offline(cluster, storage, connect, make_user, platforms=("ios", "android"), texts=("lunch?",)):
    """Bob, offline, gets a notification of Alice's message(s) on each of his devices."""
    alice, bob = make_user(), make_user()
    tokens = {p: add_device(storage, bob, p) for p in platforms}
    a = connect(alice)
    acks = [a.send_message(bob.user_id, text) for text in texts]
    wait_until(lambda: len([r for r in rows(storage, bob) if r.push_status == "success"]) == len(platforms),
               timeout=15, what="the notifications")
    wait_until(lambda: storage.redis.exists(SHOWN_KEY.format(bob.user_id)), what="the shown notifications recorded")
    return alice, bob, a, acks, tokens


def read(client, ack):
    client.send_json({"type": "read", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
    client.next_frame(lambda f: f["type"] == "read_ok" and f["msg_id"] == ack["msg_id"])


def test_a_read_on_one_device_clears_the_badge_and_withdraws_the_notification_on_the_others(
        cluster, make_user, connect, storage):
    alice, bob, _, [ack], tokens = pushed_offline(cluster, storage, connect, make_user)
    sub = add_webpush_device(cluster, bob)  # subscribed after the push: it shows nothing
    read(connect(bob), ack)
    wait_until(lambda: len([r for r in badge_rows(storage, bob) if r.push_status == "success"]) == 2, timeout=15,
               what="the badge syncs")

    [bg] = background_pushes(cluster.fakes, tokens["ios"])
    assert bg.headers["apns-priority"] == "5" and "apns-collapse-id" not in bg.headers
    assert bg.payload["aps"] == {"content-available": 1, "badge": 0}
    assert bg.payload["withdraw"] == [{"collapse_id": ack["conversation_id"], "thread_id": ack["conversation_id"],
                                       "msg_id": ack["msg_id"]}]
    [alert] = [r for r in cluster.fakes.apns.notifications if r.token == tokens["ios"] and r is not bg]
    assert alert.headers["apns-collapse-id"] == ack["conversation_id"]  # what the withdrawal names

    [data] = fcm_syncs(cluster.fakes, tokens["android"])
    assert "notification" not in data and "notification" not in data["android"]
    assert data["android"]["priority"] == "normal" and data["data"]["badge"] == "0"
    assert json.loads(data["data"]["withdraw"]) == [{"tag": ack["conversation_id"], "msg_id": ack["msg_id"]}]

    assert webpush_syncs(cluster.fakes, sub) == []  # never sent to a device that shows nothing
    logged = badge_rows(storage, bob)
    assert sorted(r.push_type for r in logged) == ["apns", "fcm"]
    assert all(r.payload["kind"] == "badge_sync" and r.payload["badge"] == 0 for r in logged)
    # Nothing is shown any more: the next read sends nothing at all.
    assert not storage.redis.exists(SHOWN_KEY.format(bob.user_id))


def test_a_webpush_device_that_shows_a_notification_gets_the_badge_sync_too(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    sub = add_webpush_device(cluster, bob)
    ack = connect(alice).send_message(bob.user_id, "are you there?")
    wait_until(lambda: [d.payload["kind"] for d in cluster.fakes.webpush.deliveries_to(sub)] == ["alert"],
               timeout=15, what="the web push")
    read(connect(bob), ack)
    wait_until(lambda: webpush_syncs(cluster.fakes, sub), timeout=15, what="the web badge sync")
    [sync] = webpush_syncs(cluster.fakes, sub)
    assert sync.payload == {"kind": "badge_sync", "badge": 0,
                            "withdraw": [{"conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]}]}
    assert sync.headers["urgency"] == "normal" and sync.headers["topic"] == "badge"


def test_a_read_of_another_conversation_updates_the_badge_but_withdraws_nothing(cluster, make_user, connect, storage):
    alice, bob, _, [ack], tokens = pushed_offline(cluster, storage, connect, make_user, platforms=("ios",))
    carol = make_user()
    other = connect(carol).send_message(bob.user_id, "and me")  # bob is offline: counted, but coalesced
    wait_until(lambda: len(rows(storage, bob)) == 2, timeout=15, what="the second notification")
    wait_until(lambda: all(r.push_status == "success" for r in rows(storage, bob)), timeout=15, what="it to go out")
    read(connect(bob), other)
    wait_until(lambda: background_pushes(cluster.fakes, tokens["ios"]), timeout=15, what="the badge sync")
    [bg] = background_pushes(cluster.fakes, tokens["ios"])
    assert bg.payload["aps"]["badge"] == 1  # alice's message is still unread
    assert [w["thread_id"] for w in bg.payload["withdraw"]] == [other["conversation_id"]]


def test_a_recalled_message_that_was_pushed_is_withdrawn(cluster, make_user, connect, storage):
    alice, bob, a, [ack], tokens = pushed_offline(cluster, storage, connect, make_user, platforms=("ios",))
    a.send_json({"type": "recall", "msg_id": ack["msg_id"]})
    a.next_frame(lambda f: f["type"] == "recalled")
    wait_until(lambda: background_pushes(cluster.fakes, tokens["ios"]), timeout=15, what="the withdrawal")
    [bg] = background_pushes(cluster.fakes, tokens["ios"])
    assert bg.payload["aps"]["badge"] == 0 and bg.payload["withdraw"][0]["msg_id"] == ack["msg_id"]
    # Alice was not pushed: she gets nothing.
    assert [r for r in rows(storage, alice) if r.target.startswith("badge:")] == []


def test_a_burst_of_100_reads_makes_at_most_one_silent_push_per_device_per_window(cluster, make_user, connect,
                                                                                  storage):
    texts = [f"m{i}" for i in range(5)]
    alice, bob, _, acks, tokens = pushed_offline(cluster, storage, connect, make_user, texts=texts)
    b = connect(bob)
    window = 1.0  # PUSH_BADGE_COALESCE_SECONDS of the test cluster
    started = time.monotonic()
    for i in range(100):  # the same reads a client replays, over and over
        b.send_json({"type": "read", "conversation_id": acks[-1]["conversation_id"], "msg_id": acks[i % 5]["msg_id"]})
    for _ in range(100):
        b.next_frame(lambda f: f["type"] == "read_ok")
    burst = time.monotonic() - started
    wait_until(lambda: not storage.redis.exists(BADGE_SYNC_KEY.format(bob.user_id))
               and len(badge_rows(storage, bob)) >= 2 and all(r.push_status != "pending" for r in badge_rows(storage, bob)),
               timeout=15, what="the badge syncs")
    time.sleep(window + 0.5)  # a second window, had the burst opened one, would have run by now
    windows = int(burst // window) + 1
    ios, android = background_pushes(cluster.fakes, tokens["ios"]), fcm_syncs(cluster.fakes, tokens["android"])
    assert 1 <= len(ios) <= windows and 1 <= len(android) <= windows
    assert len(badge_rows(storage, bob)) == len(ios) + len(android)


def _background_request(fakes, priority: str, aps: dict) -> httpx.Response:
    key = open(fakes.apns.key_file, "rb").read()
    token = jwt.encode({"iss": fakes.apns.env()["APNS_TEAM_ID"], "iat": int(time.time())}, key, algorithm="ES256",
                       headers={"kid": fakes.apns.env()["APNS_KEY_ID"]})
    with httpx.Client(http2=True, verify=str(fakes.apns.ca_file)) as client:
        return client.post(f"{fakes.apns.url}/3/device/{secrets.token_hex(32)}", content=json.dumps({"aps": aps}),
                           headers={"authorization": f"bearer {token}", "apns-topic": fakes.apns.topic,
                                    "apns-push-type": "background", "apns-priority": priority})


@pytest.mark.parametrize("priority, aps, reason", [
    ("10", {"content-available": 1, "badge": 0}, "BadPriority"),
    ("5", {"content-available": 1, "badge": 0, "alert": {"body": "hi"}}, "BadBackgroundPayload"),
    ("5", {"badge": 0}, "BadBackgroundPayload"),
])
def test_the_apns_fake_refuses_a_background_push_that_is_urgent_or_shows_something(cluster, priority, aps, reason):
    response = _background_request(cluster.fakes, priority, aps)
    assert response.status_code == 400 and response.json()["reason"] == reason
    assert _background_request(cluster.fakes, "5", {"content-available": 1, "badge": 0}).status_code == 200
