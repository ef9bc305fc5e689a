"""Presence routing, and what an offline recipient gets: unread, offline index, push record."""
import json
import secrets

from sqlalchemy import select

from app.chat.dispatch import dispatch_private_messages
from app.push.planning import PRIORITY_PRIVATE, plan_pushes
from app.chat.unread import unread_counts
from models import Device, OfflineMessageIndex, PushLog
from tests.fakes.fcm_server import make_device_token as fcm_token
from tests.harness import Gateway, wait_until


def _offline_rows(storage, user_id):
    with storage.sessions() as session:
        return session.scalars(select(OfflineMessageIndex).where(OfflineMessageIndex.user_id == int(user_id))).all()


def _push_rows(storage, user_id):
    with storage.sessions() as session:
        return session.scalars(select(PushLog).where(PushLog.user_id == int(user_id))).all()


def test_presence_entry_lives_while_connected_and_goes_on_disconnect(cluster, make_user, connect, storage):
    bob = make_user()
    b = connect(bob, cluster.gw2)
    key = f"online:user:{bob.user_id}"
    entry = json.loads(storage.redis.hget(key, b.hello["conn_id"]))
    assert entry["gateway_id"] == "gw2" and entry["last_heartbeat"] >= entry["connected_at"] > 0
    assert 0 < storage.redis.ttl(key) <= 300
    b.close()
    wait_until(lambda: storage.redis.hget(key, b.hello["conn_id"]) is None, what="presence entry removal")
    assert storage.redis.get(f"last_seen:{bob.user_id}")


def test_an_offline_recipient_gets_unread_an_offline_index_row_and_one_push(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    with storage.session() as session:
        session.add(Device(user_id=int(bob.user_id), platform="ios", token=secrets.token_hex(32)))
    a = connect(alice)
    acks = [a.send_message(bob.user_id, f"while you were away {i}") for i in range(3)]
    conversation = acks[0]["conversation_id"]
    wait_until(lambda: len(_offline_rows(storage, bob.user_id)) == 3, what="offline index rows")
    assert {r.message_id for r in _offline_rows(storage, bob.user_id)} == {int(x["msg_id"]) for x in acks}
    wait_until(lambda: [p.push_status for p in _push_rows(storage, bob.user_id)] == ["success"], timeout=15,
               what="one successful push")
    push = _push_rows(storage, bob.user_id)[0]
    assert (push.push_type, push.priority, push.message_id) == ("apns", PRIORITY_PRIVATE, int(acks[-1]["msg_id"]))
    assert unread_counts(storage, int(bob.user_id)) == {conversation: 3}
    assert unread_counts(storage, int(alice.user_id)) == {}  # one's own messages are never unread


def test_running_dispatch_and_push_planning_again_changes_nothing(cluster, make_user, connect, storage):
    """What a redelivered task does: same unread, one index row, one push row."""
    alice, bob = make_user(), make_user()
    with storage.session() as session:
        session.add(Device(user_id=int(bob.user_id), platform="android", token=fcm_token()))
    unread_counts(storage, int(bob.user_id))  # counters built: from now on dispatch counts in Redis
    ack = connect(alice).send_message(bob.user_id, "once")
    wait_until(lambda: [p.push_status for p in _push_rows(storage, bob.user_id)] == ["success"], timeout=15,
               what="the push")
    for _ in range(2):
        outcome, = dispatch_private_messages(storage, [(int(ack["msg_id"]), None)])
        assert outcome.offline_users == [int(bob.user_id)]
        assert plan_pushes(storage, [int(bob.user_id)])[0].push_ids == []  # already delivered
    assert storage.redis.hget(f"unread:{bob.user_id}", ack["conversation_id"]) == "1"
    assert len(_offline_rows(storage, bob.user_id)) == 1
    assert len(_push_rows(storage, bob.user_id)) == 1


def test_an_online_recipient_gets_no_offline_index_row_or_push(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    with storage.session() as session:
        session.add(Device(user_id=int(bob.user_id), platform="ios", token=secrets.token_hex(32)))
    b = connect(bob, cluster.gw2)
    unread_counts(storage, int(bob.user_id))  # counters built before the message: dispatch counts it
    ack = connect(alice).send_message(bob.user_id, "you're here")
    b.wait_message(ack["msg_id"])
    # Dispatch counts unread as its last step, after deciding about the offline index.
    wait_until(lambda: storage.redis.sismember(f"unread:counted:{ack['msg_id']}", bob.user_id),
               what="dispatch to finish")
    assert storage.redis.hget(f"unread:{bob.user_id}", ack["conversation_id"]) == "1"
    assert _offline_rows(storage, bob.user_id) == []
    assert not storage.redis.exists(f"push:coalesce:{bob.user_id}")  # no push was scheduled
    assert _push_rows(storage, bob.user_id) == []


def test_connections_on_a_crashed_gateway_count_as_offline(services, cluster, make_user, connect, storage, log_dir):
    alice, bob = make_user(), make_user()
    doomed = Gateway("gw-doomed", services, log_dir)
    try:
        b = connect(bob, doomed)
        doomed.kill()  # no goodbye: its presence entries stay behind in Redis
        assert storage.redis.hget(f"online:user:{bob.user_id}", b.hello["conn_id"])
        wait_until(lambda: not storage.redis.exists("gateway:alive:gw-doomed"), timeout=20,
                   interval=0.5, what="the dead gateway's liveness key to expire")
        ack = connect(alice).send_message(bob.user_id, "are you there?")
        wait_until(lambda: _offline_rows(storage, bob.user_id), what="an offline index row")
        assert _offline_rows(storage, bob.user_id)[0].message_id == int(ack["msg_id"])
        assert storage.redis.hget(f"online:user:{bob.user_id}", b.hello["conn_id"]) is None  # pruned
    finally:
        doomed.stop()


def test_rebuild_unread_command_restores_the_counters_after_redis_loses_them(cluster, make_user, connect, storage,
                                                                             services):
    import subprocess
    import sys

    alice, bob, carol = make_user(), make_user(), make_user()
    a = connect(alice)
    acks = [a.send_message(bob.user_id, "one"), a.send_message(bob.user_id, "two"),
            a.send_message(carol.user_id, "three")]
    wait_until(lambda: len(_offline_rows(storage, bob.user_id)) == 2 and _offline_rows(storage, carol.user_id),
               what="the messages dispatched")
    before = {u.user_id: unread_counts(storage, int(u.user_id)) for u in (bob, carol)}
    assert before[bob.user_id] == {acks[0]["conversation_id"]: 2}
    assert before[carol.user_id] == {acks[2]["conversation_id"]: 1}
    storage.redis.flushdb()
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "rebuild-unread",
                             "--user", bob.user_id, "--user", carol.user_id],
                            env=services.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rebuilt unread counters of 2/2 users" in result.stdout
    for user in (bob, carol):
        raw = storage.redis.hgetall(f"unread:{user.user_id}")
        assert {k: int(v) for k, v in raw.items() if k != "_seq"} == before[user.user_id]
