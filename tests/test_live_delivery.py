"""Two people chat live: one gateway, two gateways, several devices."""
import pytest
from sqlalchemy import select

from models import Conversation, Message


@pytest.mark.parametrize("same_gateway", [True, False], ids=["one_gateway", "two_gateways"])
def test_a_message_reaches_the_recipient_live_and_is_stored_once(cluster, make_user, connect, storage, same_gateway):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    b = connect(bob, cluster.gw1 if same_gateway else cluster.gw2)

    ack = a.send_message(bob.user_id, "héllo 👋🏽 — 你好")
    assert ack["type"] == "ack", ack
    live = b.wait_message(ack["msg_id"])
    assert live["content"] == "héllo 👋🏽 — 你好"
    assert live["from"] == alice.user_id and live["to"] == bob.user_id and live["group_id"] is None
    assert live["conversation_id"] == ack["conversation_id"] and live["timestamp"] == ack["timestamp"]
    assert live["client_msg_id"] == ack["client_msg_id"] and live["message_type"] == "text"
    assert isinstance(live["msg_id"], str) and live["status"] == 0

    with storage.sessions() as session:
        rows = session.scalars(select(Message).where(Message.id == int(ack["msg_id"]))).all()
        assert len(rows) == 1 and rows[0].content == "héllo 👋🏽 — 你好"  # utf8mb4 round-trip
        convs = session.scalars(select(Conversation).where(Conversation.conversation_id == ack["conversation_id"])).all()
    assert sorted(c.user_id for c in convs) == sorted([int(alice.user_id), int(bob.user_id)])
    assert all(c.last_msg_id == int(ack["msg_id"]) for c in convs)

    reply = b.send_message(alice.user_id, "hi back")
    assert a.wait_message(reply["msg_id"])["content"] == "hi back"


def test_every_device_of_both_people_gets_the_message_but_the_sending_one(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    alice_phone, alice_laptop = connect(alice, cluster.gw1), connect(alice, cluster.gw2)
    bob_phone, bob_laptop = connect(bob, cluster.gw2), connect(bob, cluster.gw1)

    ack = alice_phone.send_message(bob.user_id, "on every screen", extra={"reply_to": "123"})
    for device in (bob_phone, bob_laptop, alice_laptop):
        frame = device.wait_message(ack["msg_id"])
        assert frame["content"] == "on every screen" and frame["extra"] == {"reply_to": "123"}
    # The sending connection got the ack, not a copy of its own message.
    alice_phone.drain()
    assert not [f for f in alice_phone.messages() if f["msg_id"] == ack["msg_id"]]


def test_thirty_quick_messages_all_arrive_live_exactly_once(cluster, make_user, connect):
    """Live order is not promised (persist workers run in parallel); clients order by msg_id."""
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    acks = [a.send_message(bob.user_id, f"n{i}") for i in range(30)]
    assert all(ack["type"] == "ack" for ack in acks)
    got = [b.wait_message(ack["msg_id"])["content"] for ack in acks]
    assert got == [f"n{i}" for i in range(30)]  # matched by msg_id: each message has its own content
    b.drain()
    assert sorted(int(m["msg_id"]) for m in b.messages()) == sorted(int(a["msg_id"]) for a in acks)
    assert [int(a["msg_id"]) for a in acks] == sorted(int(a["msg_id"]) for a in acks)  # ids follow send order
