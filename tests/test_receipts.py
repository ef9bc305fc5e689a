"""Receipts, delivered and read, live and durable: `received` frames, `receipt` frames and stream entries
with `kind`, peer positions in the conversation list, and per-message receipts in groups."""
import threading

import pytest

from models import ENTRY_RECEIPT, SyncEntry
from tests.harness import wait_until
from tests.test_groups import api, group_send, make_group  # noqa: F401  (api is a fixture)
from tests.test_sync import sync_all


def _receipts(entries):
    return [(e["kind"], e["reader"], e["msg_id"]) for e in entries if e["type"] == "receipt"]


def _conversation(api, user, cid):
    [item] = [c for c in api(user)("GET", "/api/conversations").json()["conversations"] if c["conversation_id"] == cid]
    return item


def test_delivered_then_read_reach_the_sender_live_on_another_gateway_and_by_sync_when_offline(
        cluster, make_user, connect, api):
    alice, bob = make_user(), make_user()
    a1, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    first, second = a1.send_message(bob.user_id, "one"), a1.send_message(bob.user_id, "two")
    cid = first["conversation_id"]
    b.wait_message(second["msg_id"])
    b.send_json({"type": "received", "conversation_id": cid, "msg_id": second["msg_id"]})
    receipt = a1.next_frame(lambda f: f["type"] == "receipt")
    assert (receipt["kind"], receipt["reader"], receipt["msg_id"], receipt["conversation_id"]) == \
        ("delivered", bob.user_id, second["msg_id"], cid)
    item = _conversation(api, alice, cid)
    assert (item["peer_delivered_msg_id"], item["peer_read_msg_id"]) == (second["msg_id"], None)

    # Alice goes offline; Bob reads the first, then the second: two read entries wait in her stream.
    a1.close()
    for ack in (first, second):
        b.send_json({"type": "read", "conversation_id": cid, "msg_id": ack["msg_id"]})
        b.next_frame(lambda f: f["type"] == "read_ok" and f["msg_id"] == ack["msg_id"])
    a2 = connect(alice, cluster.gw2)
    entries, _, _ = sync_all(a2)
    assert _receipts(entries) == [("delivered", bob.user_id, second["msg_id"]),
                                  ("read", bob.user_id, first["msg_id"]), ("read", bob.user_id, second["msg_id"])]
    assert all(isinstance(e["timestamp"], int) for e in entries if e["type"] == "receipt")
    item = _conversation(api, alice, cid)
    assert (item["peer_read_msg_id"], item["peer_delivered_msg_id"]) == (second["msg_id"], second["msg_id"])
    # Bob's own list shows Alice's positions: she has received nothing of his.
    assert _conversation(api, bob, cid)["peer_read_msg_id"] is None


def test_a_repeated_or_older_position_tells_nobody_and_writes_no_entry(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw1)
    first, second = a.send_message(bob.user_id, "one"), a.send_message(bob.user_id, "two")
    cid = first["conversation_id"]
    b.wait_message(second["msg_id"])
    for ack in (second, second, first):  # the same twice, then an older one
        b.send_json({"type": "received", "conversation_id": cid, "msg_id": ack["msg_id"]})
    b.send_json({"type": "read", "conversation_id": cid, "msg_id": first["msg_id"]})
    b.next_frame(lambda f: f["type"] == "read_ok")
    # Frames of one connection are handled in order, and their receipts reach Alice in order.
    a.next_frame(lambda f: f["type"] == "receipt" and f["kind"] == "read")
    delivered = [f["msg_id"] for f in a.frames if f["type"] == "receipt" and f["kind"] == "delivered"]
    assert delivered == [second["msg_id"]]
    with storage.sessions() as session:
        kinds = session.query(SyncEntry).filter(SyncEntry.user_id == int(alice.user_id),
                                                SyncEntry.kind == ENTRY_RECEIPT).count()
    assert kinds == 2  # one delivered (second), one read (first); the repeats wrote nothing


def test_concurrent_receipts_leave_the_senders_stream_gap_free(cluster, make_user, connect, storage):
    """Receipts from many readers land in one author's stream while messages do: no seq repeats or skips."""
    author, readers = make_user(), [make_user() for _ in range(6)]
    a = connect(author, cluster.gw1)
    clients = [connect(r, cluster.gw1 if i % 2 else cluster.gw2) for i, r in enumerate(readers)]
    acks = {r.user_id: [a.send_message(r.user_id, f"m{i}") for i in range(5)] for r in readers}
    for r, c in zip(readers, clients):
        c.wait_message(acks[r.user_id][-1]["msg_id"])

    def confirm(reader, client):
        for ack in acks[reader.user_id]:
            client.send_json({"type": "received", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
            client.send_json({"type": "read", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})

    threads = [threading.Thread(target=confirm, args=pair) for pair in zip(readers, clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def stream():
        with storage.sessions() as session:
            return [row.seq for row in session.query(SyncEntry).filter(SyncEntry.user_id == int(author.user_id))
                    .order_by(SyncEntry.seq)]

    # 30 messages, and per message one delivered and one read receipt.
    wait_until(lambda: len(stream()) == 30 + 60, timeout=30, what="every receipt in the author's stream")
    assert stream() == list(range(1, 91))
    entries, _, _ = sync_all(connect(author, cluster.gw2))
    assert len(entries) == 90 and len({(e["type"], e.get("kind"), e.get("reader"), e["msg_id"]) for e in entries}) == 90


def test_group_receipts_count_who_received_and_read_for_the_author_only(cluster, make_user, connect, api):
    alice, bob, carol, dave = make_user(), make_user(), make_user(), make_user()
    cid = make_group(api, alice, [bob, carol])["conversation_id"]
    gid = cid[2:]
    a, b, c = connect(alice, cluster.gw1), connect(bob, cluster.gw2), connect(carol, cluster.gw1)
    ack = group_send(a, gid, "lunch?")
    for client in (b, c):
        client.wait_message(ack["msg_id"])
    b.send_json({"type": "received", "conversation_id": cid, "msg_id": ack["msg_id"]})
    assert a.next_frame(lambda f: f["type"] == "receipt")["kind"] == "delivered"
    c.send_json({"type": "read", "conversation_id": cid, "msg_id": ack["msg_id"]})
    assert a.next_frame(lambda f: f["type"] == "receipt" and f["reader"] == carol.user_id)["kind"] == "read"
    # Dave joins after the message: he is not among its recipients.
    assert api(alice)("POST", f"/api/groups/{gid}/members", json={"user_ids": [dave.user_id]}).status_code in (200, 201)
    r = api(alice)("GET", f"/api/conversations/{cid}/messages/{ack['msg_id']}/receipts")
    assert r.status_code == 200, r.text
    assert r.json() == {"msg_id": ack["msg_id"], "conversation_id": cid, "recipients": 2, "read_count": 1,
                        "delivered_count": 2, "read_by": [carol.user_id],
                        "delivered_to": sorted([bob.user_id, carol.user_id], key=int)}
    assert api(bob)("GET", f"/api/conversations/{cid}/messages/{ack['msg_id']}/receipts").status_code == 403
    assert api(dave)("GET", f"/api/conversations/{cid}/messages/{ack['msg_id']}/receipts").status_code == 403
    outsider = make_user()
    assert api(outsider)("GET", f"/api/conversations/{cid}/messages/{ack['msg_id']}/receipts").status_code == 403
    assert api(alice)("GET", f"/api/conversations/{cid}/messages/1/receipts").status_code == 404
    assert api(alice)("GET", f"/api/conversations/{cid}/messages/abc/receipts").status_code == 400


@pytest.mark.parametrize("frame, code", [
    ({"type": "received", "conversation_id": "p_1_2"}, "invalid_frame"),
    ({"type": "received", "conversation_id": 12, "msg_id": "1"}, "invalid_frame"),
    ({"type": "received", "conversation_id": "p_1_2", "msg_id": "x1"}, "invalid_frame"),
    ({"type": "received", "conversation_id": "p_999999998_999999999", "msg_id": "1"}, "not_found"),
])
def test_bad_received_frames_get_an_error_and_the_connection_stays_open(cluster, make_user, connect, frame, code):
    alice, bob = make_user(), make_user()
    a = connect(alice)
    a.send_json(frame)
    assert a.next_frame(lambda f: f["type"] == "error")["code"] == code
    assert a.send_message(bob.user_id, "still here")["type"] == "ack"


def test_received_in_someone_elses_conversation_is_forbidden(cluster, make_user, connect):
    alice, bob, mallory = make_user(), make_user(), make_user()
    ack = connect(alice).send_message(bob.user_id, "private")
    m = connect(mallory)
    m.send_json({"type": "received", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
    assert m.next_frame(lambda f: f["type"] == "error")["code"] == "forbidden"
