"""The "recently active, now gone" window: a live message that no device of the recipient confirms
within LIVE_CONFIRM_SECONDS (10 s here, the default) takes the offline path, push included.

A half-dead connection is a client that stops reading without closing its socket: the server's
writes still succeed (the kernel buffers them) and its presence stays, as for a phone in a tunnel.
"""
import time

from sqlalchemy import select

from app.chat.confirm import PENDING_KEY
from models import OfflineMessageIndex
from tests.harness import wait_until
from tests.test_push import add_device, apns_for

WINDOW = 10  # LIVE_CONFIRM_SECONDS of the test cluster's workers (the default)


def _index_rows(storage, user, msg_id):
    with storage.sessions() as session:
        return session.scalars(select(OfflineMessageIndex.id).where(
            OfflineMessageIndex.user_id == int(user.user_id), OfflineMessageIndex.message_id == int(msg_id))).all()


def _pending_for(storage, user):
    return [m for m in storage.redis.zrange(PENDING_KEY, 0, -1) if m.startswith(f"{user.user_id}:")]


def test_a_half_dead_connection_gets_the_message_pushed_once_after_the_window(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    a = connect(alice, cluster.gw1)
    b = connect(bob, cluster.gw2)  # Bob's phone: online, then it stops reading (never closes)
    sent_at = time.monotonic()
    ack = a.send_message(bob.user_id, "are you in the tunnel?")
    wait_until(lambda: _pending_for(storage, bob), what="the live delivery awaiting Bob's confirmation")
    assert storage.redis.hlen(f"online:user:{bob.user_id}") == 1  # still looks online
    wait_until(lambda: apns_for(cluster.fakes, token), timeout=WINDOW + 20, what="the push after the window")
    assert time.monotonic() - sent_at >= WINDOW - 1  # not before the window closed
    [note] = apns_for(cluster.fakes, token)
    assert note.payload["msg_id"] == ack["msg_id"]
    assert len(_index_rows(storage, bob, ack["msg_id"])) == 1  # and the offline path's index row
    wait_until(lambda: not _pending_for(storage, bob), what="the entry settled")
    # Exactly once: nothing more comes for it (the next message's push would come after this one).
    control = connect(make_user(), cluster.gw1).send_message(bob.user_id, "second sender")
    wait_until(lambda: len(apns_for(cluster.fakes, token)) == 2, timeout=WINDOW + 20, what="the control push")
    assert [n.payload["msg_id"] for n in apns_for(cluster.fakes, token)] == [ack["msg_id"], control["msg_id"]]
    b.close()


def test_a_device_that_confirms_or_reads_in_time_gets_no_push(cluster, make_user, connect, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    token = add_device(storage, bob, "ios")
    a = connect(alice, cluster.gw1)
    phone, laptop = connect(bob, cluster.gw2), connect(bob, cluster.gw1)  # the phone goes half-dead
    read_elsewhere = a.send_message(bob.user_id, "read on the laptop")
    laptop.wait_message(read_elsewhere["msg_id"])
    laptop.send_json({"type": "read", "conversation_id": read_elsewhere["conversation_id"],
                      "msg_id": read_elsewhere["msg_id"]})
    laptop.next_frame(lambda f: f["type"] == "read_ok")
    c = connect(carol, cluster.gw2)
    confirmed = c.send_message(bob.user_id, "confirmed by the laptop")
    laptop.wait_message(confirmed["msg_id"])
    laptop.send_json({"type": "received", "conversation_id": confirmed["conversation_id"],
                      "msg_id": confirmed["msg_id"]})
    # Both entries settle at their deadline as confirmed: no index row, no push.
    wait_until(lambda: len(_pending_for(storage, bob)) == 2, what="both deliveries awaiting confirmation")
    wait_until(lambda: not _pending_for(storage, bob), timeout=WINDOW + 20, what="both deliveries settled")
    control = connect(make_user(), cluster.gw1).send_message(bob.user_id, "control")  # not confirmed: pushed
    wait_until(lambda: apns_for(cluster.fakes, token), timeout=WINDOW + 20, what="the control push")
    assert [n.payload["msg_id"] for n in apns_for(cluster.fakes, token)] == [control["msg_id"]]
    assert _index_rows(storage, bob, read_elsewhere["msg_id"]) == [] == _index_rows(storage, bob, confirmed["msg_id"])
    phone.close()
