"""Typing indicators, replies and mentions end to end: real gateways, workers and push fakes."""
import secrets
import time

from sqlalchemy import select

from app.chat.conversations import private_conversation_id
from app.chat.typing import THROTTLE_KEY
from app.chat.unread import unread_counts
from models import Message
from tests.harness import wait_until
from tests.test_groups import add_ios_device, api, group_send, make_group  # noqa: F401 (api: a fixture)
from tests.test_sync import sync_all


def pid(a, b):
    return private_conversation_id(int(a.user_id), int(b.user_id))


def typing(client, conversation_id, state="start"):
    client.send_json({"type": "typing", "conversation_id": conversation_id, "state": state})


def typings(client):
    return [f for f in client.frames if f["type"] == "typing"]


def error_of(client):
    return client.next_frame(lambda f: f["type"] == "error")


def still_open(client):
    client.send_json({"type": "ping"})
    client.next_frame(lambda f: f["type"] == "pong")


def send(client, fields, client_msg_id=None):
    cmid = client_msg_id or secrets.token_hex(8)
    client.send_json({"type": "send", "client_msg_id": cmid, "content": "hi", **fields})
    return client.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"))


def stored(storage, client_msg_id):
    with storage.sessions() as session:
        return session.scalar(select(Message).where(Message.client_msg_id == client_msg_id))


def history(api, user, conversation_id):
    r = api(user)("GET", f"/api/conversations/{conversation_id}/messages")
    assert r.status_code == 200, r.text
    return {m["msg_id"]: m for m in r.json()["messages"]}


def pushes_to(cluster, token):
    return [n for n in cluster.fakes.apns.notifications if n.token == token]


def settled(storage, user):
    wait_until(lambda: not storage.redis.exists(f"push:coalesce:{user.user_id}"), timeout=15,
               what="the push planner to run")


# --- typing ------------------------------------------------------------------------

def test_typing_reaches_every_device_of_the_peer_on_both_gateways_but_not_the_typist_and_is_never_synced(
        cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    a, a_tablet = connect(alice, cluster.gw1), connect(alice, cluster.gw2)
    b_phone, b_laptop = connect(bob, cluster.gw2), connect(bob, cluster.gw1)
    cid = pid(alice, bob)
    typing(a, cid, "start")
    for client in (b_phone, b_laptop):
        frame = client.next_frame(lambda f: f["type"] == "typing")
        assert {k: v for k, v in frame.items() if k != "_taken"} == {
            "type": "typing", "conversation_id": cid, "user_id": alice.user_id, "state": "start"}
    # A later message reaches the typist's tablet: had the typing frame gone there, it came first.
    ack = a.send_message(bob.user_id, "done typing")
    a_tablet.wait_message(ack["msg_id"])
    assert typings(a_tablet) == [] and typings(a) == []
    entries, _, _ = sync_all(b_phone)
    assert [e["type"] for e in entries] == ["message"]  # typing is never stored or synced


def test_two_starts_within_a_second_relay_once_and_a_stop_right_after_still_goes_out(
        cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, a_laptop, b = connect(alice, cluster.gw1), connect(alice, cluster.gw2), connect(bob, cluster.gw2)
    cid = pid(alice, bob)
    typing(a, cid, "start")
    typing(a, cid, "start")  # dropped by the gateway itself
    still_open(a)
    typing(a_laptop, cid, "start")  # another device, another gateway: dropped by the shared limit
    still_open(a_laptop)
    typing(a, cid, "stop")
    b.next_frame(lambda f: f["type"] == "typing" and f["state"] == "stop")
    assert [f["state"] for f in typings(b)] == ["start", "stop"]  # the other starts were dropped, unanswered
    assert [f for f in a.frames + a_laptop.frames if f["type"] == "error"] == []
    # Once the second is over, a start goes out again.
    wait_until(lambda: not storage.redis.exists(THROTTLE_KEY.format(alice.user_id, cid)), what="the relay window")
    typing(a, cid, "start")
    b.next_frame(lambda f: f["type"] == "typing" and f["state"] == "start")


def test_typing_in_a_group_reaches_members_only_and_bad_typing_frames_get_errors(
        cluster, make_user, connect, api):
    alice, bob, carol, dave = (make_user() for _ in range(4))
    created = make_group(api, alice, [bob, dave])
    gid, cid = created["group_id"], created["conversation_id"]
    a, b, c, d = connect(alice, cluster.gw1), connect(bob, cluster.gw2), connect(carol, cluster.gw2), \
        connect(dave, cluster.gw1)
    typing(a, cid)
    frame = b.next_frame(lambda f: f["type"] == "typing")
    assert (frame["conversation_id"], frame["user_id"]) == (cid, alice.user_id)
    d.next_frame(lambda f: f["type"] == "typing")
    ack = a.send_message(carol.user_id, "not in the group")  # reaches carol after any typing frame would have
    c.wait_message(ack["msg_id"])
    assert typings(c) == []

    # A non-member may not type into the group, nor into someone else's private chat.
    typing(c, cid)
    assert error_of(c)["code"] == "forbidden"
    typing(c, pid(alice, bob))
    assert error_of(c)["code"] == "forbidden"
    typing(c, "g_999999999999")
    assert error_of(c)["code"] == "not_found"
    for bad in ({"conversation_id": cid, "state": "typing"}, {"conversation_id": cid},
                {"conversation_id": 5, "state": "start"}, {"conversation_id": "p_2_1", "state": "start"},
                {"conversation_id": "x_1", "state": "start"}):
        c.send_json({"type": "typing", **bad})
        assert error_of(c)["code"] == "invalid_frame", bad
    still_open(c)

    # Removed from the group: no more typing frames, either way.
    assert api(alice)("DELETE", f"/api/groups/{gid}/members/{dave.user_id}").status_code in (200, 204)
    typing(d, cid)
    assert error_of(d)["code"] == "forbidden"
    typing(b, cid)
    a.next_frame(lambda f: f["type"] == "typing" and f["user_id"] == bob.user_id)
    ack = a.send_message(dave.user_id, "you left")
    d.wait_message(ack["msg_id"])
    assert [f["user_id"] for f in typings(d)] == [alice.user_id]  # only the one from before the removal


# --- replies -----------------------------------------------------------------------

def test_a_reply_carries_reply_to_live_in_sync_and_in_history(cluster, make_user, connect, api):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    first = a.send_message(bob.user_id, "lunch?")
    plain = b.wait_message(first["msg_id"])
    assert plain["reply_to"] is None and plain["mentions"] == []
    reply = send(b, {"to": alice.user_id, "content": "yes!", "reply_to": first["msg_id"]})
    assert reply["type"] == "ack", reply
    assert a.wait_message(reply["msg_id"])["reply_to"] == first["msg_id"]
    entries, _, _ = sync_all(a)
    by_id = {e["msg_id"]: e for e in entries}
    assert by_id[reply["msg_id"]]["reply_to"] == first["msg_id"] and by_id[first["msg_id"]]["reply_to"] is None
    assert by_id[reply["msg_id"]]["mentions"] == []
    shown = history(api, alice, first["conversation_id"])
    assert shown[reply["msg_id"]]["reply_to"] == first["msg_id"] and shown[first["msg_id"]]["reply_to"] is None


def test_a_reply_to_a_message_elsewhere_unknown_or_invisible_is_not_found_and_stores_nothing(
        cluster, make_user, connect, storage, api):
    alice, bob, carol, newcomer = (make_user() for _ in range(4))
    a, n = connect(alice), connect(newcomer)
    other_chat = a.send_message(carol.user_id, "between alice and carol")
    created = make_group(api, alice, [bob])
    gid, cid = created["group_id"], created["conversation_id"]
    before_join = group_send(a, gid, "said before the newcomer joined")
    wait_until(lambda: stored(storage, before_join["client_msg_id"]) is not None, what="the group message stored")
    assert api(alice)("POST", f"/api/groups/{gid}/members", json={"user_ids": [newcomer.user_id]}).status_code \
        in (200, 201), "newcomer added"
    wait_until(lambda: stored(storage, other_chat["client_msg_id"]) is not None, what="the private message stored")
    refused = [
        (a, {"to": bob.user_id, "reply_to": other_chat["msg_id"]}),  # another conversation's message
        (a, {"to": bob.user_id, "reply_to": "123456789012345"}),  # no such message
        (n, {"group_id": gid, "reply_to": before_join["msg_id"]}),  # sent before the newcomer joined
    ]
    for client, fields in refused:
        cmid = secrets.token_hex(8)
        answer = send(client, fields, cmid)
        assert (answer["type"], answer["code"]) == ("error", "not_found"), (fields, answer)
        still_open(client)
        assert stored(storage, cmid) is None
    bad = send(a, {"to": bob.user_id, "reply_to": "abc"})
    assert bad["code"] == "invalid_frame"
    # The same client_msg_id may be sent again, fixed: it was never accepted. A retry gets the same msg_id.
    cmid = secrets.token_hex(8)
    assert send(n, {"group_id": gid, "reply_to": before_join["msg_id"]}, cmid)["code"] == "not_found"
    ok = send(n, {"group_id": gid, "content": "hello all"}, cmid)
    assert ok["type"] == "ack"
    wait_until(lambda: stored(storage, cmid) is not None, what="the newcomer's message stored")
    later = send(n, {"group_id": gid, "content": "me again", "reply_to": ok["msg_id"]})
    assert later["type"] == "ack"
    assert send(n, {"group_id": gid, "content": "me again", "reply_to": ok["msg_id"]},
                later["client_msg_id"])["msg_id"] == later["msg_id"]
    assert history(api, bob, cid)[later["msg_id"]]["reply_to"] == ok["msg_id"]


# --- mentions ------------------------------------------------------------------------

def test_mentions_are_validated_deduplicated_and_carried_live_in_sync_and_in_history(
        cluster, make_user, connect, api):
    alice, bob, carol, outsider = (make_user() for _ in range(4))
    created = make_group(api, alice, [bob, carol])
    gid, cid = created["group_id"], created["conversation_id"]
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    ack = send(a, {"group_id": gid, "content": "@bob @carol look", "mentions": [bob.user_id, carol.user_id,
                                                                               bob.user_id]})
    assert ack["type"] == "ack", ack
    assert b.wait_message(ack["msg_id"])["mentions"] == [bob.user_id, carol.user_id]
    entries, _, _ = sync_all(b)
    assert [e["mentions"] for e in entries if e.get("msg_id") == ack["msg_id"]] == [[bob.user_id, carol.user_id]]
    assert history(api, carol, cid)[ack["msg_id"]]["mentions"] == [bob.user_id, carol.user_id]

    assert send(a, {"group_id": gid, "mentions": [outsider.user_id]})["code"] == "not_found"
    for bad in (["x"], "bob", [bob.user_id] * 51, {"u": bob.user_id}):
        assert send(a, {"group_id": gid, "mentions": bad})["code"] == "invalid_frame", bad
    assert send(a, {"to": bob.user_id, "mentions": [bob.user_id]})["code"] == "invalid_frame"  # private chats
    assert send(a, {"to": bob.user_id, "mentions": []})["type"] == "ack"
    still_open(a)


def test_a_mention_is_pushed_through_a_muted_group_with_the_mention_in_the_text_but_not_in_quiet_hours(
        cluster, make_user, connect, storage, api):
    alice, bob, dan = make_user(), make_user(), make_user()
    bob_phone, dan_phone = add_ios_device(storage, bob), add_ios_device(storage, dan)
    created = make_group(api, alice, [bob, dan], name="Launch")
    gid, cid = created["group_id"], created["conversation_id"]
    for user in (bob, dan):  # both muted the group; both are offline
        api(user)("PUT", "/api/push-settings", json={"muted_conversations": [cid]}).raise_for_status()
    a = connect(alice)
    ack = send(a, {"group_id": gid, "content": "can you check the rocket?", "mentions": [bob.user_id]})
    assert ack["type"] == "ack"
    wait_until(lambda: pushes_to(cluster, bob_phone), timeout=15, what="bob's push")
    [note] = pushes_to(cluster, bob_phone)
    assert note.payload["aps"]["alert"] == {"title": "Launch",
                                            "body": f"{alice.username} mentioned you: can you check the rocket?"}
    assert note.payload["msg_id"] == ack["msg_id"]
    settled(storage, dan)
    assert pushes_to(cluster, dan_phone) == []  # muted and not mentioned: nothing

    # Do-not-disturb hours hold even for a mention.
    now = time.gmtime()
    api(bob)("PUT", "/api/push-settings", json={
        "do_not_disturb": {"start": f"{(now.tm_hour - 1) % 24:02d}:00", "end": f"{(now.tm_hour + 2) % 24:02d}:00"},
        "time_zone": "UTC"}).raise_for_status()
    quiet = send(a, {"group_id": gid, "content": "still there?", "mentions": [bob.user_id]})
    assert quiet["type"] == "ack"
    wait_until(lambda: unread_counts(storage, int(bob.user_id)) == {cid: 2}, what="bob's unread")
    settled(storage, bob)
    assert len(pushes_to(cluster, bob_phone)) == 1


def test_typing_to_someone_who_blocked_you_is_not_relayed_and_not_answered(cluster, make_user, connect, api):
    alice, bob = make_user(), make_user()
    assert api(bob)("PUT", f"/api/blocks/{alice.user_id}").status_code in (200, 204)
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    typing(a, pid(alice, bob))
    still_open(a)  # answered in order: no error came before the pong
    assert [f for f in a.frames if f["type"] == "error"] == []
    typing(b, pid(alice, bob))  # the other way round is fine
    a.next_frame(lambda f: f["type"] == "typing" and f["user_id"] == bob.user_id)
    ack = send(b, {"to": alice.user_id, "content": "I blocked you"})
    a.wait_message(ack["msg_id"])
    assert typings(b) == []
