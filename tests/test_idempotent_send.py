"""Re-sending the same client_msg_id returns the same msg_id and stores one row."""
import signal

from sqlalchemy import func, select

from models import Message
from tests.harness import ChatClient, Gateway, wait_out_of_risk_window, wait_until


def _rows(storage, sender_id, client_msg_id):
    with storage.sessions() as session:
        return session.scalars(select(Message).where(Message.sender_id == int(sender_id),
                                                     Message.client_msg_id == client_msg_id)).all()


def test_a_retry_after_a_lost_ack_gets_the_same_msg_id_and_one_row(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    first = a.send_message(bob.user_id, "only once", client_msg_id="retry-1")
    b.wait_message(first["msg_id"])
    # The client lost the ack, reconnects to the other gateway and retries.
    a2 = connect(alice, cluster.gw2)
    again = a2.send_message(bob.user_id, "only once", client_msg_id="retry-1")
    assert again["type"] == "ack"
    assert (again["msg_id"], again["conversation_id"], again["timestamp"]) == \
        (first["msg_id"], first["conversation_id"], first["timestamp"])
    wait_until(lambda: len(_rows(storage, alice.user_id, "retry-1")) == 1, what="the row")
    b.drain()
    assert len([m for m in b.messages() if m["client_msg_id"] == "retry-1"]) == 1


def test_client_msg_ids_are_per_sender_and_case_sensitive(cluster, make_user, connect):
    alice, carol, bob = make_user(), make_user(), make_user()
    a, c = connect(alice), connect(carol)
    ids = {a.send_message(bob.user_id, "x", client_msg_id="same")["msg_id"],
           c.send_message(bob.user_id, "y", client_msg_id="same")["msg_id"],
           a.send_message(bob.user_id, "z", client_msg_id="SAME")["msg_id"]}
    assert len(ids) == 3


def test_a_retry_while_the_first_copy_is_still_queued_stores_one_row(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    a.send_message(bob.user_id, "before")  # (Redis is new: a send starts its memory)
    wait_out_of_risk_window(storage.redis, cluster.gw1, cluster.gw2)  # acks no longer wait for storage
    cluster.persist.signal(signal.SIGSTOP)  # nothing leaves the queue
    try:
        first = a.send_message(bob.user_id, "queued", client_msg_id="queued-1")
        again = connect(alice, cluster.gw2).send_message(bob.user_id, "queued", client_msg_id="queued-1")
        assert first["type"] == again["type"] == "ack" and again["msg_id"] == first["msg_id"]
        assert _rows(storage, alice.user_id, "queued-1") == []  # really still queued
    finally:
        cluster.persist.signal(signal.SIGCONT)
    wait_until(lambda: _rows(storage, alice.user_id, "queued-1"), what="the message to be stored")
    assert [r.id for r in _rows(storage, alice.user_id, "queued-1")] == [int(first["msg_id"])]


def test_after_redis_is_flushed_a_retry_still_gets_the_same_msg_id(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    first = a.send_message(bob.user_id, "survives a flush", client_msg_id="flush-1")
    wait_until(lambda: _rows(storage, alice.user_id, "flush-1"), what="the message to be stored")
    storage.redis.flushdb()
    again = a.send_message(bob.user_id, "survives a flush", client_msg_id="flush-1")
    assert again["type"] == "ack" and again["msg_id"] == first["msg_id"]
    with storage.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Message).where(
            Message.sender_id == int(alice.user_id))) == 1
    # The system keeps working after the flush: gateways re-register presence.
    b = connect(bob, cluster.gw2)
    later = a.send_message(bob.user_id, "after the flush")
    assert b.wait_message(later["msg_id"])["content"] == "after the flush"


def test_concurrent_duplicates_get_one_msg_id(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    devices = [connect(alice, cluster.gw1 if i % 2 else cluster.gw2) for i in range(4)]
    for d in devices:
        d.send_json({"type": "send", "client_msg_id": "race-1", "to": bob.user_id, "content": "race"})
    answers = [d.next_frame(lambda f: f.get("client_msg_id") == "race-1" and f["type"] in ("ack", "error"))
               for d in devices]
    assert {a["type"] for a in answers} == {"ack"}
    assert len({a["msg_id"] for a in answers}) == 1
    wait_until(lambda: _rows(storage, alice.user_id, "race-1"), what="the row")
    assert len(_rows(storage, alice.user_id, "race-1")) == 1


def test_redis_flushed_while_the_first_copy_is_queued_the_retry_gets_the_stored_msg_id(
        services, cluster, make_user, connect, storage, log_dir):
    """The hardest case: the dedupe key is gone and MySQL does not have the row yet."""
    recovering = Gateway("gw-recovery", services, log_dir)
    alice, bob = make_user(), make_user()
    connect(alice, cluster.gw1).send_message(bob.user_id, "before")
    wait_out_of_risk_window(storage.redis, cluster.gw1)  # the first copy's ack does not wait
    try:
        cluster.persist.signal(signal.SIGSTOP)
        try:
            first = connect(alice, cluster.gw1).send_message(bob.user_id, "in the queue", client_msg_id="lost-1")
            assert first["type"] == "ack"
            storage.redis.flushdb()  # Redis forgets the dedupe key while the first copy waits in the queue
            retry_client = ChatClient(recovering.ws, alice.token)
            retry_client.send_json({"type": "send", "client_msg_id": "lost-1", "to": bob.user_id,
                                    "content": "in the queue"})
            retry_client.drain(quiet=0.5)
            assert not [f for f in retry_client.frames if f["type"] == "ack"]  # no ack before it is stored
        finally:
            cluster.persist.signal(signal.SIGCONT)
        again = retry_client.next_frame(
            lambda f: f.get("client_msg_id") == "lost-1" and f["type"] in ("ack", "error"), timeout=15)
        assert again["type"] == "ack"
        # Two copies were queued; persist keeps one. The retry's ack names the one kept:
        # the first copy, unless both copies were persisted at the same moment.
        rows = _rows(storage, alice.user_id, "lost-1")
        assert [r.id for r in rows] == [int(again["msg_id"])]
        retry_client.close()
    finally:
        recovering.stop()
