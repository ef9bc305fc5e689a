"""Cold state: a new deployment and a Redis that lost its memory (flush, restart) keep every send
idempotent, and leave the risk window as soon as the persist pipeline drained past the loss
(app/chat/recovery.py)."""
import signal
import threading
import uuid

import pytest
import redis
import requests
from sqlalchemy import create_engine, func, select

from models import Message
from tests.harness import (
    ChatClient, Gateway, Worker, provision_real, real_services_reachable, register_and_login, wait_out_of_risk_window,
    wait_until,
)
from tests.test_groups import group_send, make_group
from tests.test_sync import sync_all


def _rows(storage, sender_id, client_msg_id):
    with storage.sessions() as session:
        return session.scalars(select(Message).where(Message.sender_id == int(sender_id),
                                                     Message.client_msg_id == client_msg_id)).all()


def _answer(client, cmid, timeout=15):
    return client.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"),
                             timeout=timeout)


def _once_in_stream(client, msg_id) -> int:
    entries, _, _ = sync_all(client)
    return sum(1 for e in entries if e.get("type") == "message" and e["msg_id"] == msg_id)


@pytest.fixture
def api(cluster):
    from tests.test_groups import Api

    return lambda user: Api(cluster.gw1.http, user)


def test_redis_flushed_while_first_copies_are_queued_retries_get_the_stored_copy_and_one_copy_is_kept(
        cluster, make_user, connect, storage, api):
    alice, bob, carol = make_user(), make_user(), make_user()
    group = make_group(api, alice, [bob, carol], name="Cold")
    a = connect(alice, cluster.gw1)
    connect(bob, cluster.gw2)  # (a gateway starts its intake with its first connection)
    a.send_message(bob.user_id, "before")
    wait_out_of_risk_window(storage.redis, cluster.gw1, cluster.gw2)  # first copies are acked at once
    cluster.persist.signal(signal.SIGSTOP)  # persist stopped: the first copies stay queued
    try:
        first_private = a.send_message(bob.user_id, "queued private", client_msg_id="cold-p1")
        first_group = group_send(a, group["group_id"], "queued group", client_msg_id="cold-g1")
        assert first_private["type"] == first_group["type"] == "ack"
        storage.redis.flushdb()  # Redis forgets both records while the copies wait in the queue
        retry = connect(alice, cluster.gw2)
        retry.send_json({"type": "send", "client_msg_id": "cold-p1", "to": bob.user_id, "content": "queued private"})
        retry.send_json({"type": "send", "client_msg_id": "cold-g1", "group_id": group["group_id"],
                         "content": "queued group"})
        retry.drain(quiet=2.0)
        # A stopped persist worker never counts as drained: no ack names a copy that may lose.
        assert not [f for f in retry.frames if f["type"] in ("ack", "error")]
        assert storage.redis.get(f"dedupe:drained:{cluster.gw2.gateway_id}") is None
    finally:
        cluster.persist.signal(signal.SIGCONT)
    again_private, again_group = _answer(retry, "cold-p1"), _answer(retry, "cold-g1")
    assert again_private["type"] == again_group["type"] == "ack"
    # The retry gets the first copy's msg_id (its own copy was never published), and one copy is stored.
    assert again_private["msg_id"] == first_private["msg_id"]
    assert again_group["msg_id"] == first_group["msg_id"]
    assert [r.id for r in _rows(storage, alice.user_id, "cold-p1")] == [int(again_private["msg_id"])]
    assert [r.id for r in _rows(storage, alice.user_id, "cold-g1")] == [int(again_group["msg_id"])]
    # And once the window closed, a third attempt is answered from the rebuilt record.
    wait_out_of_risk_window(storage.redis, cluster.gw1, cluster.gw2)
    third = connect(alice, cluster.gw1).send_message(bob.user_id, "queued private", client_msg_id="cold-p1")
    assert third["msg_id"] == again_private["msg_id"]
    for user, msg_ids in ((alice, [again_private["msg_id"], again_group["msg_id"]]),
                          (bob, [again_private["msg_id"], again_group["msg_id"]]), (carol, [again_group["msg_id"]])):
        reader = connect(user, cluster.gw2)
        for msg_id in msg_ids:  # (a group message reaches the streams with its fan-out, after persist)
            wait_until(lambda: _once_in_stream(reader, msg_id) > 0, what=f"msg {msg_id} in user {user.user_id}'s stream")
            assert _once_in_stream(reader, msg_id) == 1, f"msg {msg_id} not exactly once in user {user.user_id}'s stream"


def test_redis_flushed_while_the_gateway_batches_claims(cluster, make_user, connect, storage):
    senders, bob = [make_user() for _ in range(4)], make_user()
    clients = [connect(s, cluster.gw1 if i % 2 else cluster.gw2) for i, s in enumerate(senders)]
    cmids = {i: [f"batch-{i}-{n}" for n in range(60)] for i in range(len(clients))}
    flush_at = threading.Event()

    def burst(i):
        for n, cmid in enumerate(cmids[i]):
            clients[i].send_json({"type": "send", "client_msg_id": cmid, "to": bob.user_id, "content": f"m{n}"})
            if n == 20 and i == 0:
                flush_at.set()

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    flush_at.wait(10)
    storage.redis.flushdb()  # in the middle of the bursts: some claims in the old memory, some in the new
    for t in threads:
        t.join()
    first = {cmid: _answer(clients[i], cmid) for i in cmids for cmid in cmids[i]}
    acked = {cmid: f["msg_id"] for cmid, f in first.items() if f["type"] == "ack"}
    assert len(acked) == len(first), {f.get("code") for f in first.values() if f["type"] == "error"}
    # Every one retried on the other gateway: the same msg_id, one row.
    retries = [connect(s, cluster.gw2 if i % 2 else cluster.gw1) for i, s in enumerate(senders)]
    for i, client in enumerate(retries):
        for cmid in cmids[i]:
            client.send_json({"type": "send", "client_msg_id": cmid, "to": bob.user_id, "content": "again"})
    for i, client in enumerate(retries):
        for cmid in cmids[i]:
            again = _answer(client, cmid)
            assert again["type"] == "ack" and again["msg_id"] == acked[cmid], cmid
    for i, sender in enumerate(senders):
        wait_until(lambda: all(len(_rows(storage, sender.user_id, c)) == 1 for c in cmids[i]), timeout=20,
                   what="every message stored once")
        assert {str(r.id) for c in cmids[i] for r in _rows(storage, sender.user_id, c)} == \
            {acked[c] for c in cmids[i]}


@pytest.fixture
def new_deployment(services, log_dir):
    """Services of its own: an empty database, vhost and Redis db, as on the first start."""
    if services.kind != "real" or not real_services_reachable():
        pytest.skip("needs MySQL, RabbitMQ and Redis")
    from app.storage import upgrade_schema

    own = provision_real(uuid.uuid4().hex[:10])
    procs = []
    try:
        upgrade_schema(own.database_url)
        procs.append(Gateway("gw-new-1", own, log_dir))
        procs.append(Gateway("gw-new-2", own, log_dir))
        procs.append(Worker("persist-new", "private_messages,group_messages", own, log_dir))
        procs.append(Worker("dispatch-new", "offline_messages", own, log_dir))
        yield own, procs
    finally:
        for proc in reversed(procs):
            proc.stop()
        own.close()


def test_a_new_deployments_first_sends_are_idempotent_and_it_leaves_the_risk_window_in_seconds(new_deployment):
    own, (gw1, gw2, persist, _) = new_deployment
    cache = redis.Redis.from_url(own.redis_url)
    engine = create_engine(own.database_url)
    users = []
    for _ in range(2):
        name = f"u{uuid.uuid4().hex[:12]}"
        requests.post(f"{gw1.http}/api/auth/register", json={"username": name, "password": "correct-horse"},
                      timeout=10).raise_for_status()
        body = requests.post(f"{gw1.http}/api/auth/login", json={"username": name, "password": "correct-horse"},
                             timeout=10).json()
        users.append((body["user_id"], body["access_token"]))
    (alice, alice_token), (bob, _) = users
    a, a2 = ChatClient(gw1.ws, alice_token), ChatClient(gw2.ws, alice_token)
    try:
        # In the risk window a send is published only once no earlier copy can be queued: when the
        # window closes (nothing is queued on a new deployment, so in seconds).
        first = a.send_message(bob, "hello, new deployment", client_msg_id="first-ever")
        assert first["type"] == "ack"
        wait_until(lambda: _count(engine, "first-ever") == 1, what="the first message stored")
        with engine.connect() as conn:
            assert conn.scalar(select(Message.id).where(Message.client_msg_id == "first-ever")) == \
                int(first["msg_id"])
        assert a2.send_message(bob, "hello, new deployment", client_msg_id="first-ever")["msg_id"] == first["msg_id"]
        wait_out_of_risk_window(cache, gw1, gw2, timeout=20)
        # Nothing was stored before this Redis's memory began: nothing to rebuild.
        assert cache.get("dedupe:recovered") == cache.get("dedupe:since")
        # Out of the window an ack no longer waits for storage: it comes with persist stopped.
        persist.signal(signal.SIGSTOP)
        try:
            later = a.send_message(bob, "while persist is stopped", client_msg_id="later")
            assert later["type"] == "ack"
            assert a2.send_message(bob, "while persist is stopped", client_msg_id="later")["msg_id"] == \
                later["msg_id"]
        finally:
            persist.signal(signal.SIGCONT)
        wait_until(lambda: _count(engine, "later") == 1, what="the message stored")
        assert _count(engine, "first-ever") == 1
    finally:
        a.close()
        a2.close()
        engine.dispose()


def test_a_persist_worker_killed_inside_the_window_holds_it_open_seconds_not_minutes(new_deployment, log_dir):
    own, (gw1, gw2, _, _) = new_deployment
    doomed = Worker("persist-doomed", "private_messages,group_messages", own, log_dir)
    try:
        cache = redis.Redis.from_url(own.redis_url, decode_responses=True)
        alice, bob = (register_and_login(gw1.http) for _ in range(2))
        a = ChatClient(gw1.ws, alice.token)
        ChatClient(gw2.ws, bob.token).close()  # the second gateway's intake starts too
        wait_until(lambda: any((c.get("name") or "").endswith(f":{doomed.proc.pid}") for c in cache.client_list()),
                   what="the doomed worker's named connection")
        a.send_json({"type": "send", "client_msg_id": "w-0", "to": bob.user_id, "content": "opens the window"})
        wait_until(lambda: cache.get("dedupe:since"), what="the first claim")
        doomed.kill()  # inside the window: its report stays behind, silent, until it expires (90 s)
        # The send still gets its ack (the surviving worker stores it), and the window closes once the
        # dead worker is known gone, well before its report would have expired.
        assert a.next_frame(lambda f: f.get("client_msg_id") == "w-0", timeout=30)["type"] == "ack"
        wait_out_of_risk_window(cache, gw1, gw2, timeout=30)
        assert "is gone" in gw1.log_text() + gw2.log_text()
        a.close()
    finally:
        doomed.stop()


def _count(engine, cmid):
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Message).where(Message.client_msg_id == cmid))


def test_after_the_window_a_retry_of_a_send_from_before_the_loss_is_answered_from_the_rebuilt_records(
        cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a = connect(alice, cluster.gw1)
    connect(bob, cluster.gw2)
    before = [a.send_message(bob.user_id, f"before the loss {n}", client_msg_id=f"old-{n}") for n in range(3)]
    wait_until(lambda: all(_rows(storage, alice.user_id, f"old-{n}") for n in range(3)), what="the sends stored")
    storage.redis.flushdb()
    connect(make_user(), cluster.gw1).send_message(bob.user_id, "someone else starts the new memory")
    wait_out_of_risk_window(storage.redis, cluster.gw1, cluster.gw2)
    # Out of the window the retries do not wait for storage: they find their records again.
    cluster.persist.signal(signal.SIGSTOP)
    try:
        retry = connect(alice, cluster.gw2)
        for n, first in enumerate(before):
            again = retry.send_message(bob.user_id, f"before the loss {n}", client_msg_id=f"old-{n}")
            assert (again["type"], again["msg_id"], again["timestamp"]) == ("ack", first["msg_id"], first["timestamp"])
        new = retry.send_message(bob.user_id, "a new one", client_msg_id="new-after-window")
        assert new["type"] == "ack" and new["msg_id"] not in {f["msg_id"] for f in before}
    finally:
        cluster.persist.signal(signal.SIGCONT)
    assert storage.redis.get(f"dedupe:rebuilt:{alice.user_id}") == storage.redis.get("dedupe:since")
    wait_until(lambda: _rows(storage, alice.user_id, "new-after-window"), what="the new send stored")
    assert all(len(_rows(storage, alice.user_id, f"old-{n}")) == 1 for n in range(3))
