"""Offline path: gap-free sync, unread, read receipts on every device, recall."""
import threading
import time
import uuid

import pytest
from sqlalchemy import select

from app.chat.conversations import private_conversation_id
from app.chat.persist import persist_private_message
from app.chat.unread import unread_counts
from models import STATUS_RECALLED, Conversation, Message, OfflineMessageIndex
from tests.harness import wait_until


def sync_all(client, cursor=None, limit=100):
    """Page through the stream; returns (entries, final cursor, pages)."""
    entries, pages = [], 0
    while True:
        client.send_json({"type": "sync", "cursor": cursor, "limit": limit})
        batch = client.next_frame(lambda f: f["type"] == "sync_batch")
        pages += 1
        assert len(batch["messages"]) <= limit
        entries += batch["messages"]
        cursor = batch["cursor"]
        if not batch["has_more"]:
            return entries, cursor, pages


def _payload(sender, to, content, msg_id, timestamp=None):
    return {"msg_id": str(msg_id), "conversation_id": private_conversation_id(sender, to), "sender_id": sender,
            "to": to, "group_id": None, "client_msg_id": uuid.uuid4().hex, "message_type": "text",
            "content": content, "extra": {}, "timestamp": timestamp or int(time.time() * 1000), "origin_conn": None}


def _stored_for(storage, user):
    with storage.sessions() as session:
        return session.query(Message).filter(Message.receiver_id == int(user.user_id)).count()


def _is_stored(storage, msg_id):
    with storage.sessions() as session:
        return session.get(Message, msg_id) is not None


def _index_rows(storage, user):
    with storage.sessions() as session:
        return session.query(OfflineMessageIndex).filter(OfflineMessageIndex.user_id == int(user.user_id)).count()


def test_offline_user_gets_300_messages_once_then_read_and_recall_reach_every_device(
        cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    acks = [a.send_message(bob.user_id, f"message {i}") for i in range(300)]
    assert {x["type"] for x in acks} == {"ack"}
    conversation = acks[0]["conversation_id"]
    wait_until(lambda: _stored_for(storage, bob) == 300, timeout=60, what="300 stored messages")
    wait_until(lambda: _index_rows(storage, bob) == 300, timeout=60, what="300 offline index rows")

    bob_phone = connect(bob, cluster.gw2)
    entries, cursor, pages = sync_all(bob_phone, limit=100)
    assert pages >= 3
    ids = [e["msg_id"] for e in entries]
    assert len(ids) == 300 and len(set(ids)) == 300  # every message, exactly once
    assert sorted(ids, key=int) == [x["msg_id"] for x in acks]  # msg_id order is send order
    assert all(e["type"] == "message" and e["from"] == alice.user_id for e in entries)
    bob_tablet = connect(bob, cluster.gw1)
    again, _, _ = sync_all(bob_tablet, limit=500)
    assert [e["msg_id"] for e in again] == ids  # a stable order
    bob_tablet.close()
    assert unread_counts(storage, int(bob.user_id)) == {conversation: 300}

    # Redis forgets; the counts come back from MySQL unchanged.
    storage.redis.flushdb()
    assert unread_counts(storage, int(bob.user_id)) == {conversation: 300}
    # The gateways put presence back by themselves within seconds.
    wait_until(lambda: storage.redis.hlen(f"online:user:{alice.user_id}"), timeout=15, what="presence restored")

    # Read on the phone: the laptop is told, Alice gets a receipt, unread is 0.
    bob_laptop = connect(bob, cluster.gw1)
    last = acks[-1]["msg_id"]
    bob_phone.send_json({"type": "read", "conversation_id": conversation, "msg_id": last})
    assert bob_phone.next_frame(lambda f: f["type"] == "read_ok")["msg_id"] == last
    assert bob_laptop.next_frame(lambda f: f["type"] == "read_ok") == \
        {"type": "read_ok", "conversation_id": conversation, "msg_id": last, "_taken": True}
    receipt = a.next_frame(lambda f: f["type"] == "receipt")
    assert (receipt["conversation_id"], receipt["reader"], receipt["msg_id"]) == (conversation, bob.user_id, last)
    assert unread_counts(storage, int(bob.user_id)) == {}

    # A recall while Bob is away shows on his next sync.
    bob_phone.close(), bob_laptop.close()
    wait_until(lambda: not storage.redis.hlen(f"online:user:{bob.user_id}"), what="Bob offline")
    fresh = a.send_message(bob.user_id, "oops, wrong chat")
    a.send_json({"type": "recall", "msg_id": fresh["msg_id"]})
    assert a.next_frame(lambda f: f["type"] == "recalled")["msg_id"] == fresh["msg_id"]
    wait_until(lambda: _index_rows(storage, bob) == 301, timeout=30, what="dispatch to index every message")
    later, _, _ = sync_all(connect(bob, cluster.gw2), cursor=cursor)
    assert [(e["type"], e["msg_id"]) for e in later] == [("message", fresh["msg_id"]), ("recalled", fresh["msg_id"])]
    assert later[0]["status"] == STATUS_RECALLED and later[0]["content"] == ""
    assert unread_counts(storage, int(bob.user_id)) == {}  # a recalled message is not unread
    with storage.sessions() as session:
        previews = session.scalars(select(Conversation.last_message).where(
            Conversation.conversation_id == conversation)).all()
    assert previews == ["[message recalled]"] * 2
    with storage.sessions() as session:
        index = session.scalars(select(OfflineMessageIndex).where(
            OfflineMessageIndex.user_id == int(bob.user_id))).all()
    assert index and all(row.synced and row.synced_at for row in index)


def test_a_message_committed_after_a_later_one_is_not_skipped(cluster, make_user, connect, storage):
    """Ids are made at the gateway and commits land in any order: sync must not be 'id > last'."""
    alice, bob = make_user(), make_user()
    a_id, b_id = int(alice.user_id), int(bob.user_id)
    warm_up = int(connect(alice).send_message(bob.user_id, "warm-up")["msg_id"])
    wait_until(lambda: _is_stored(storage, warm_up), what="the warm-up message stored")
    early_id, late_id = warm_up + 1, warm_up + 2  # two unused ids, early < late
    bob_client = connect(bob)
    _, cursor, _ = sync_all(bob_client)

    persist_private_message(storage, _payload(a_id, b_id, "sent second, committed first", late_id))
    seen, cursor, _ = sync_all(bob_client, cursor=cursor)
    assert [e["msg_id"] for e in seen] == [str(late_id)]
    persist_private_message(storage, _payload(a_id, b_id, "sent first, committed last", early_id))
    seen, cursor, _ = sync_all(bob_client, cursor=cursor)
    assert [e["msg_id"] for e in seen] == [str(early_id)]  # "id > last seen id" would have skipped it
    assert sync_all(bob_client, cursor=cursor)[0] == []


def test_sync_during_concurrent_commits_sees_every_message_exactly_once(cluster, make_user, connect, storage):
    alice, carol, bob = make_user(), make_user(), make_user()
    b_id = int(bob.user_id)
    base = int(connect(alice).send_message(bob.user_id, "first")["msg_id"])
    wait_until(lambda: _is_stored(storage, base), what="the first message stored")
    bob_client = connect(bob, cluster.gw2)
    _, cursor, _ = sync_all(bob_client)
    expected, errors = set(), []

    def writer(sender, offset):
        try:
            for i in range(40):
                msg_id = base + 1000 + offset + i * 8  # interleaved ids, committed out of id order
                persist_private_message(storage, _payload(sender, b_id, f"w{offset}-{i}", msg_id))
                expected.add(str(msg_id))
        except Exception as exc:  # surfaces in the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(sender, off)) for sender, off in
               [(int(alice.user_id), 0), (int(carol.user_id), 1), (int(alice.user_id), 2), (int(carol.user_id), 3)]]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        page, cursor, _ = sync_all(bob_client, cursor=cursor, limit=7)
        seen += [e["msg_id"] for e in page]
    for t in threads:
        t.join()
    page, cursor, _ = sync_all(bob_client, cursor=cursor)
    seen += [e["msg_id"] for e in page]
    assert not errors
    assert len(seen) == len(set(seen)) == 160 and set(seen) == expected


@pytest.mark.parametrize("frame, message_part", [
    ({"type": "sync", "cursor": "abc"}, "cursor"),
    ({"type": "sync", "cursor": 5}, "cursor"),
    ({"type": "sync", "cursor": None, "limit": 0}, "limit"),
    ({"type": "sync", "cursor": None, "limit": "10"}, "limit"),
    ({"type": "read", "conversation_id": 5, "msg_id": "1"}, "conversation_id"),
    ({"type": "read", "conversation_id": "p_1_2", "msg_id": "x"}, "msg_id"),
    ({"type": "recall"}, "msg_id"),
])
def test_bad_sync_read_and_recall_frames_get_invalid_frame(cluster, make_user, connect, frame, message_part):
    client = connect(make_user())
    client.send_json(frame)
    err = client.next_frame(lambda f: f["type"] == "error")
    assert err["code"] == "invalid_frame" and message_part in err["message"]


def test_a_large_limit_is_capped_at_500(cluster, make_user, connect, storage):
    from bench.sync import seed_backlog

    sender, reader = make_user(), make_user()
    seed_backlog(storage, int(sender.user_id), int(reader.user_id), 600)
    client = connect(reader)
    client.send_json({"type": "sync", "cursor": None, "limit": 100000})
    batch = client.next_frame(lambda f: f["type"] == "sync_batch")
    assert len(batch["messages"]) == 500 and batch["has_more"] is True
    rest, _, _ = sync_all(client, cursor=batch["cursor"], limit=500)
    assert len(rest) == 100


def test_read_of_a_conversation_one_is_not_in_is_refused(cluster, make_user, connect, storage):
    alice, bob, eve = make_user(), make_user(), make_user()
    ack = connect(alice).send_message(bob.user_id, "private")
    wait_until(lambda: _is_stored(storage, int(ack["msg_id"])), what="the message stored")
    eve_client = connect(eve)
    eve_client.send_json({"type": "read", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
    assert eve_client.next_frame(lambda f: f["type"] == "error")["code"] == "forbidden"
    eve_client.send_json({"type": "read", "conversation_id": "p_1_999999999", "msg_id": ack["msg_id"]})
    assert eve_client.next_frame(lambda f: f["type"] == "error")["code"] == "not_found"


def test_recall_rules(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    ack = a.send_message(bob.user_id, "take this back", extra={"reply_to": "42", "file": "secret.pdf"})
    b.wait_message(ack["msg_id"])

    b.send_json({"type": "recall", "msg_id": ack["msg_id"]})  # not Bob's message
    assert b.next_frame(lambda f: f["type"] == "error")["code"] == "forbidden"
    a.send_json({"type": "recall", "msg_id": "123456789"})
    assert a.next_frame(lambda f: f["type"] == "error")["code"] == "not_found"

    old_id = int(ack["msg_id"]) + 7
    persist_private_message(storage, _payload(int(alice.user_id), int(bob.user_id), "long ago", old_id,
                                              timestamp=int(time.time() * 1000) - 121_000))
    a.send_json({"type": "recall", "msg_id": str(old_id)})
    err = a.next_frame(lambda f: f["type"] == "error")
    assert err["code"] == "recall_expired"

    a.send_json({"type": "recall", "msg_id": ack["msg_id"]})
    expected = {"type": "recalled", "msg_id": ack["msg_id"], "conversation_id": ack["conversation_id"]}
    for client in (a, b):
        frame = client.next_frame(lambda f: f["type"] == "recalled")
        assert {k: frame[k] for k in expected} == expected
    with storage.sessions() as session:
        row = session.get(Message, int(ack["msg_id"]))
        assert row.status == STATUS_RECALLED and row.content == "" and row.extra is None
        convs = session.scalars(select(Conversation).where(
            Conversation.conversation_id == ack["conversation_id"])).all()
    assert {c.last_message for c in convs} == {"long ago"}  # the newest message stays the preview
