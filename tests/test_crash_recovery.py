"""A persist worker SIGKILLed after the ack and before its commit loses nothing."""
import time

import pymysql
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from models import Message
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
        real_services, cluster, make_user, connect, storage):
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
