"""Edit (`edit` → `edited`) and reactions (`react` → `reaction`) end to end: two users on two
gateways, an offline device that syncs, history, a group's late joiner, and every bad input
answered with its error code on a connection that stays open (docs/protocol.md §22, §23)."""
import time

import pytest
import requests

from tests.harness import ChatClient, Gateway, wait_until
from tests.test_groups import group_send, make_group
from tests.test_sync import sync_all


def _call(cluster, user, method, path, **kwargs):
    return requests.request(method, f"{cluster.gw1.http}{path}", timeout=10,
                            headers={"Authorization": f"Bearer {user.token}"}, **kwargs)


def _history(cluster, user, conversation_id):
    r = _call(cluster, user, "GET", f"/api/conversations/{conversation_id}/messages")
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def _error(client, frame):
    client.send_json(frame)
    return client.next_frame(lambda f: f["type"] == "error")["code"]


def _of(msg_id, kind):
    return lambda f: f["type"] == kind and f["msg_id"] == msg_id


@pytest.fixture
def api(cluster):
    class Api:
        def __init__(self, user):
            self.user = user

        def __call__(self, method, path, **kwargs):
            return _call(cluster, self.user, method, path, **kwargs)
    return Api


def test_an_edit_and_a_reaction_reach_both_gateways_an_offline_device_and_history(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    sender, reader = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    ack = sender.send_message(bob.user_id, "dinner at 7?")
    msg_id, cid = ack["msg_id"], ack["conversation_id"]
    assert reader.wait_message(msg_id)["edited_at"] is None

    sender.send_json({"type": "edit", "msg_id": msg_id, "content": "dinner at 8?"})
    answer = sender.next_frame(_of(msg_id, "edited"))
    assert answer["content"] == "dinner at 8?" and answer["conversation_id"] == cid
    assert isinstance(answer["edited_at"], int) and answer["edited_at"] >= ack["timestamp"]
    assert reader.next_frame(_of(msg_id, "edited")) == answer  # the same frame to every party

    reader.send_json({"type": "react", "msg_id": msg_id, "emoji": "👍", "op": "add"})
    reaction = {"type": "reaction", "msg_id": msg_id, "conversation_id": cid, "user_id": bob.user_id,
                "emoji": "👍", "op": "add"}
    for client in (reader, sender):  # the reactor's answer is the reaction frame itself
        got = client.next_frame(_of(msg_id, "reaction"))
        assert {k: v for k, v in got.items() if k != "_taken"} == reaction
    reader.send_json({"type": "react", "msg_id": msg_id, "emoji": "👍", "op": "add"})  # again: the same answer
    assert reader.next_frame(_of(msg_id, "reaction"))["op"] == "add"
    reader.send_json({"type": "react", "msg_id": msg_id, "emoji": "🎉", "op": "remove"})  # absent: the same
    assert reader.next_frame(_of(msg_id, "reaction"))["emoji"] == "🎉"
    sender.send_json({"type": "ping"})
    sender.next_frame(lambda f: f["type"] == "pong")
    assert [f for f in sender.drain() if f["type"] == "reaction"] == []  # nothing changed: nothing sent

    # Bob's other device was offline: its sync holds the message as it is now, then both events.
    later = ChatClient(cluster.gw1.ws, bob.token)
    try:
        entries = [e for e in sync_all(later)[0] if e["msg_id"] == msg_id]
    finally:
        later.close()
    assert [e["type"] for e in entries] == ["message", "edited", "reaction"]
    message, edited, synced_reaction = entries
    assert (message["content"], message["edited_at"], message["reactions"]) == (
        "dinner at 8?", answer["edited_at"], {"👍": [bob.user_id]})
    assert edited == {"type": "edited", "msg_id": msg_id, "conversation_id": cid, "content": "dinner at 8?",
                      "edited_at": answer["edited_at"]}
    assert synced_reaction == reaction
    for user in (alice, bob):
        shown, = _history(cluster, user, cid)
        assert (shown["content"], shown["edited_at"], shown["reactions"]) == (
            "dinner at 8?", answer["edited_at"], {"👍": [bob.user_id]})

    reader.send_json({"type": "react", "msg_id": msg_id, "emoji": "👍", "op": "remove"})
    sender.next_frame(lambda f: f["type"] == "reaction" and f["op"] == "remove")
    assert _history(cluster, alice, cid)[0]["reactions"] == {}


def test_in_a_group_a_late_joiner_neither_sees_nor_reacts_to_earlier_messages(cluster, make_user, connect, api):
    owner, bob, late = make_user(), make_user(), make_user()
    created = make_group(api, owner, [bob])
    gid, cid = created["group_id"], created["conversation_id"]
    o, b = connect(owner, cluster.gw1), connect(bob, cluster.gw2)
    early = group_send(b, gid, "before you joined")
    o.wait_message(early["msg_id"])
    assert api(owner)("POST", f"/api/groups/{gid}/members", json={"user_ids": [late.user_id]}).status_code == 200
    newcomer = connect(late, cluster.gw2)
    after = group_send(b, gid, "welcome!")
    newcomer.wait_message(after["msg_id"])

    assert _error(newcomer, {"type": "react", "msg_id": early["msg_id"], "emoji": "👀", "op": "add"}) == "not_found"
    assert _error(newcomer, {"type": "edit", "msg_id": early["msg_id"], "content": "mine now"}) == "not_found"
    b.send_json({"type": "edit", "msg_id": early["msg_id"], "content": "before you joined (fixed)"})
    o.next_frame(_of(early["msg_id"], "edited"))
    newcomer.send_json({"type": "react", "msg_id": after["msg_id"], "emoji": "👋", "op": "add"})
    for client in (o, b, newcomer):
        assert client.next_frame(_of(after["msg_id"], "reaction"))["user_id"] == late.user_id
    newcomer.drain()
    assert [f for f in newcomer.frames if f.get("msg_id") == early["msg_id"] and f["type"] != "error"] == []

    entries = sync_all(connect(late, cluster.gw1))[0]
    assert [(e["type"], e["msg_id"]) for e in entries
            if e.get("conversation_id") == cid and e["type"] != "group_event"] == [
        ("message", after["msg_id"]), ("reaction", after["msg_id"])]
    assert [m["content"] for m in _history(cluster, owner, cid)] == ["welcome!", "before you joined (fixed)"]
    assert [m["reactions"] for m in _history(cluster, late, cid)] == [{"👋": [late.user_id]}]


def test_bad_edits_and_reactions_get_their_error_code_and_the_connection_stays_open(cluster, make_user, connect):
    alice, bob, stranger = make_user(), make_user(), make_user()
    sender, reader, other = connect(alice, cluster.gw1), connect(bob, cluster.gw2), connect(stranger)
    ack = sender.send_message(bob.user_id, "the original")
    recalled = sender.send_message(bob.user_id, "taken back")
    reader.wait_message(recalled["msg_id"])
    sender.send_json({"type": "recall", "msg_id": recalled["msg_id"]})
    sender.next_frame(_of(recalled["msg_id"], "recalled"))
    msg_id, unknown = ack["msg_id"], "987654321987654321"
    big = "x" * (16384 + 1)  # MESSAGE_MAX_CONTENT_BYTES + 1, as for a send

    cases = [
        (sender, {"type": "edit", "content": "no id"}, "invalid_frame"),
        (sender, {"type": "edit", "msg_id": "abc", "content": "x"}, "invalid_frame"),
        (sender, {"type": "edit", "msg_id": msg_id}, "invalid_frame"),
        (sender, {"type": "edit", "msg_id": msg_id, "content": 5}, "invalid_frame"),
        (sender, {"type": "edit", "msg_id": msg_id, "content": ""}, "invalid_frame"),
        (sender, {"type": "edit", "msg_id": msg_id, "content": big}, "too_large"),
        (sender, {"type": "edit", "msg_id": msg_id, "content": "the original"}, "invalid_frame"),  # unchanged
        (sender, {"type": "edit", "msg_id": unknown, "content": "x"}, "not_found"),
        (reader, {"type": "edit", "msg_id": msg_id, "content": "bob's words"}, "forbidden"),  # someone else's
        (other, {"type": "edit", "msg_id": msg_id, "content": "x"}, "not_found"),  # may not see it
        (sender, {"type": "edit", "msg_id": recalled["msg_id"], "content": "back"}, "forbidden"),
        (reader, {"type": "react", "msg_id": msg_id, "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": 1, "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "", "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "👍" * 9, "op": "add"}, "invalid_frame"),  # 36 bytes
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "nice", "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "👍 ", "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "👍", "op": "toggle"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": msg_id, "emoji": "👍"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": [msg_id], "emoji": "👍", "op": "add"}, "invalid_frame"),
        (reader, {"type": "react", "msg_id": unknown, "emoji": "👍", "op": "add"}, "not_found"),
        (other, {"type": "react", "msg_id": msg_id, "emoji": "👍", "op": "add"}, "not_found"),
        (reader, {"type": "react", "msg_id": recalled["msg_id"], "emoji": "👍", "op": "add"}, "forbidden"),
    ]
    for client, frame, code in cases:
        assert _error(client, frame) == code, frame
    for client in (sender, reader, other):  # every connection still open and answering
        client.send_json({"type": "ping"})
        client.next_frame(lambda f: f["type"] == "pong")
    assert _history(cluster, bob, ack["conversation_id"])[-1]["content"] == "the original"


def test_after_the_edit_window_an_edit_gets_edit_expired(services, log_dir, cluster, make_user):
    gateway = Gateway("gw-edit-window", services, log_dir, MESSAGE_EDIT_WINDOW_SECONDS="1")
    alice, bob = make_user(), make_user()
    try:
        sender, reader = ChatClient(gateway.ws, alice.token), ChatClient(cluster.gw2.ws, bob.token)
        ack = sender.send_message(bob.user_id, "quick")
        reader.wait_message(ack["msg_id"])
        wait_until(lambda: time.time() * 1000 > ack["timestamp"] + 1000, what="the edit window to pass")
        assert _error(sender, {"type": "edit", "msg_id": ack["msg_id"], "content": "too late"}) == "edit_expired"
        sender.send_json({"type": "react", "msg_id": ack["msg_id"], "emoji": "⏰", "op": "add"})  # no window
        assert reader.next_frame(_of(ack["msg_id"], "reaction"))["user_id"] == alice.user_id
        assert _history(cluster, bob, ack["conversation_id"])[0]["content"] == "quick"
        sender.close()
        reader.close()
    finally:
        gateway.stop()


def test_a_send_after_an_edit_is_acked_while_the_edit_waits_and_a_sync_waits_for_the_edit(
        cluster, make_user, connect, storage):
    """An edit stuck behind another writer's lock on its message holds up none of the sends behind it
    (docs/protocol.md §1); a sync sent after it waits for it and finds its entry."""
    from sqlalchemy import select

    from models import Message

    alice, bob = make_user(), make_user()
    sender, reader = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    ack = sender.send_message(bob.user_id, "meet at the station")
    msg_id = ack["msg_id"]
    reader.wait_message(msg_id)
    with storage.session() as session:  # another transaction holds the message row until the block ends
        session.execute(select(Message.id).where(Message.id == int(msg_id)).with_for_update())
        sender.send_json({"type": "edit", "msg_id": msg_id, "content": "meet at the bridge", "client_msg_id": "e-1"})
        later = sender.send_message(bob.user_id, "running late")
        assert later["type"] == "ack"  # answered while the edit still waits for the row
        assert reader.wait_message(later["msg_id"])["content"] == "running late"
        sender.send_json({"type": "sync", "cursor": None, "limit": 100})
        assert not [f for f in sender.frames if f["type"] in ("edited", "sync_batch", "error")]
    edited = sender.next_frame(_of(msg_id, "edited"))
    batch = sender.next_frame(lambda f: f["type"] == "sync_batch")
    order = [f["type"] for f in sender.frames if f["type"] in ("ack", "edited", "sync_batch")]
    assert order == ["ack", "ack", "edited", "sync_batch"]
    assert edited["content"] == "meet at the bridge"
    assert [e for e in batch["messages"] if e["type"] == "edited" and e["msg_id"] == msg_id]


def test_an_edit_refused_beside_the_sends_names_its_client_msg_id(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    sender = connect(alice, cluster.gw1)
    ack = sender.send_message(bob.user_id, "hello")
    sender.send_json({"type": "edit", "msg_id": ack["msg_id"], "content": "hello", "client_msg_id": "e-same"})
    error = sender.next_frame(lambda f: f["type"] == "error")
    assert (error["code"], error["client_msg_id"]) == ("invalid_frame", "e-same")
    sender.send_json({"type": "react", "msg_id": "1", "emoji": "👍", "op": "add", "client_msg_id": "r-unknown"})
    error = sender.next_frame(lambda f: f["type"] == "error")
    assert (error["code"], error["client_msg_id"]) == ("not_found", "r-unknown")
