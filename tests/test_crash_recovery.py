"""A persist worker SIGKILLed after the ack and before its commit loses nothing."""
import secrets
import signal

import pymysql
from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.chat.unread import unread_counts
from models import Device, Message, OfflineMessageIndex, PushLog
from tests.harness import wait_until


def _admin_connection(database_url):
    url = make_url(database_url)
    return pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
                           database=url.database, autocommit=True)


def _blocked_persist_queries(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                    "WHERE DB = DATABASE() AND INFO LIKE 'INSERT INTO conversation%%' AND ID <> CONNECTION_ID()")
        return cur.fetchone()[0]


def test_persist_worker_killed_mid_transaction_loses_and_duplicates_nothing(
        real_services, out_of_risk_window, cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    locker = _admin_connection(real_services.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLES conversation WRITE")
        ack = a.send_message(bob.user_id, "survives a crash", client_msg_id="crash-1")
        assert ack["type"] == "ack"  # acknowledged: from here on it must never be lost
        # The worker has inserted the message row and waits on the conversation table, uncommitted.
        wait_until(lambda: _blocked_persist_queries(locker), timeout=15, what="persist to block mid-transaction")
        cluster.persist.kill()
    finally:
        with locker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        locker.close()
    with storage.sessions() as session:
        assert session.get(Message, int(ack["msg_id"])) is None  # the killed transaction did not commit

    cluster.ensure_persist_worker()  # RabbitMQ redelivers the unacknowledged task to the new worker
    live = b.wait_message(ack["msg_id"], timeout=30)
    assert live["content"] == "survives a crash"
    with storage.sessions() as session:
        rows = session.scalars(select(Message).where(Message.sender_id == int(alice.user_id))).all()
    assert [r.id for r in rows] == [int(ack["msg_id"])]
    b.drain(quiet=0.5)
    assert len([m for m in b.messages() if m["msg_id"] == ack["msg_id"]]) == 1


def test_dispatch_worker_killed_with_tasks_in_hand_delivers_everything_once(
        real_services, cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = secrets.token_hex(32)
    with storage.session() as session:
        session.add(Device(user_id=int(bob.user_id), platform="ios", token=token))
    unread_counts(storage, int(bob.user_id))  # counters built: dispatch does the counting
    a, alice_tablet = connect(alice, cluster.gw1), connect(alice, cluster.gw2)
    cluster.dispatch.signal(signal.SIGSTOP)  # it takes its prefetched tasks down with it
    try:
        acks = [a.send_message(bob.user_id, f"through a crash {i}") for i in range(10)]
        wait_until(lambda: _stored(storage, alice) == 10, what="the messages stored")
    finally:
        cluster.dispatch.kill()
    cluster.ensure_dispatch_worker()  # RabbitMQ hands the unacknowledged tasks to the new worker

    def index_rows():
        with storage.sessions() as session:
            return session.scalars(select(OfflineMessageIndex.message_id).where(
                OfflineMessageIndex.user_id == int(bob.user_id))).all()

    wait_until(lambda: len(index_rows()) == 10, timeout=30, what="all ten dispatched")
    assert sorted(index_rows()) == sorted(int(x["msg_id"]) for x in acks)
    conversation = acks[0]["conversation_id"]
    wait_until(lambda: storage.redis.hget(f"unread:{bob.user_id}", conversation) == "10", what="unread 10")
    for ack in acks:  # Alice's other device saw each message once
        alice_tablet.wait_message(ack["msg_id"])
    alice_tablet.drain()
    assert len([m for m in alice_tablet.messages()]) == 10
    def delivered_pushes():
        with storage.sessions() as session:
            return session.scalars(select(PushLog).where(PushLog.user_id == int(bob.user_id),
                                                         PushLog.push_status == "success")).all()

    # The provider answers before the row is marked: wait for the row, not for the fake.
    wait_until(delivered_pushes, timeout=15, what="the push recorded as delivered")
    # Coalesced: one push per window, not one per message (two if the new worker straddled a window).
    assert 1 <= len(delivered_pushes()) <= 2
    assert any(n.token == token for n in cluster.fakes.apns.notifications)
    assert unread_counts(storage, int(bob.user_id)) == {conversation: 10}


def _stored(storage, user):
    with storage.sessions() as session:
        return session.query(Message).filter(Message.sender_id == int(user.user_id)).count()
