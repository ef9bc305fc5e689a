"""What operators rely on: dead letters, unique ids across gateways, the admin dashboard, the API document."""
import re
import secrets
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from app.chat.conversations import private_conversation_id
from app.chat.persist import IdCollision, persist_private_message
from app.ids import LEASE_KEY, LeasedIds, NodeLease
from models import Device, PushLog, User
from tests.harness import wait_until


def test_a_task_that_fails_for_good_is_dead_lettered_not_dropped_and_can_be_replayed(real_services, cluster):
    from tasks.dead_letters import dead_letter_count, replay_dead_letters
    from tasks.messages import persist_message

    before = dead_letter_count()
    persist_message.apply_async(args=[{"msg_id": "1", "note": "a payload persist cannot handle"}])
    wait_until(lambda: dead_letter_count() == before + 1, timeout=20, what="the task in dead_letters")
    assert replay_dead_letters(limit=10) == before + 1  # sent back to private_messages ...
    wait_until(lambda: dead_letter_count() == before + 1, timeout=20, what="it to fail and come back")


def test_two_messages_with_one_id_are_never_merged(cluster, make_user, storage):
    alice, bob, carol = (int(make_user().user_id) for _ in range(3))
    msg_id = int(time.time() * 1000) << 22

    def payload(sender, to, cmid):
        return {"msg_id": str(msg_id), "conversation_id": private_conversation_id(sender, to), "sender_id": sender,
                "to": to, "group_id": None, "client_msg_id": cmid, "message_type": "text", "content": "x",
                "extra": {}, "timestamp": int(time.time() * 1000), "origin_conn": None}

    assert persist_private_message(storage, payload(alice, bob, "a")).stored
    assert not persist_private_message(storage, payload(alice, bob, "a")).stored  # a redelivery
    with pytest.raises(IdCollision):
        persist_private_message(storage, payload(carol, bob, "c"))


def test_a_gateway_whose_lease_lapsed_moves_to_a_free_node_before_making_ids(storage):
    now = [1000.0]
    ids = LeasedIds(NodeLease(storage.redis, ttl_seconds=60), clock=lambda: now[0])
    first_node = ids.node_id
    # The gateway stalls past its lease; another gateway takes the node meanwhile.
    storage.redis.set(LEASE_KEY.format(first_node), "someone-else", ex=60)
    now[0] += 61
    ids.next_id()
    assert ids.node_id != first_node
    assert storage.redis.get(LEASE_KEY.format(ids.node_id)) == ids.lease.owner
    storage.redis.delete(LEASE_KEY.format(first_node), LEASE_KEY.format(ids.node_id))


def test_admin_dashboard_login_list_and_retry(cluster, make_user, connect, storage):
    alice, bob, admin, plain = make_user(), make_user(), make_user(), make_user()
    with storage.session() as session:
        session.execute(update(User).where(User.id == int(admin.user_id)).values(is_admin=True))
        token = secrets.token_hex(32)
        session.add(Device(user_id=int(bob.user_id), platform="ios", token=token))
    cluster.fakes.apns.fail_token(token, 400, "BadExpirationDate")
    connect(alice).send_message(bob.user_id, "dashboard me")

    def bob_pushes():
        with storage.sessions() as session:
            return session.scalars(select(PushLog).where(PushLog.user_id == int(bob.user_id))).all()

    wait_until(lambda: [p.push_status for p in bob_pushes()] == ["failed"], timeout=15, what="a failed push")
    base = f"{cluster.gw1.http}/admin"

    anonymous = requests.get(f"{base}/pushes", allow_redirects=False)
    assert anonymous.status_code == 302 and "/admin/login" in anonymous.headers["Location"]
    browser = requests.Session()
    r = browser.post(f"{base}/login", data={"username": plain.username, "password": "correct-horse"})
    assert r.status_code == 403 and "not an admin" in r.text
    r = browser.post(f"{base}/login", data={"username": admin.username, "password": "wrong"})
    assert r.status_code == 401 and "wrong username or password" in r.text
    r = browser.post(f"{base}/login", data={"username": admin.username, "password": "correct-horse"})
    assert r.status_code == 200 and "BadExpirationDate" in r.text
    push_id = bob_pushes()[0].id
    assert f'action="/admin/pushes/{push_id}/retry"' in r.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)

    assert browser.post(f"{base}/pushes/{push_id}/retry", data={"csrf": "forged"}).status_code == 400
    cluster.fakes.apns.reset()
    r = browser.post(f"{base}/pushes/{push_id}/retry", data={"csrf": csrf})
    assert r.status_code == 200 and f"Push {push_id} queued for another attempt." in r.text
    wait_until(lambda: [p.push_status for p in bob_pushes()] == ["success"], timeout=15, what="the retried push")
    assert any(n.token == token for n in cluster.fakes.apns.notifications)


def test_the_openapi_document_lists_every_rest_path_the_app_serves():
    import yaml

    from app import create_app

    spec = yaml.safe_load((Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text())
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops
                  if method in ("get", "post", "put", "delete", "patch")}
    app = create_app()
    served = set()
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/") or rule.rule in ("/healthz", "/readyz")):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        served |= {(path, m) for m in rule.methods if m in ("GET", "POST", "PUT", "DELETE", "PATCH")}
    assert served == documented, {"undocumented": served - documented, "not served": documented - served}


def test_housekeeping_drops_only_what_is_past_retention(cluster, make_user, storage):
    from datetime import datetime, timedelta

    from app.chat.maintenance import purge_synced_offline_index, reconcile_unread
    from app.push.admin import purge_push_log
    from models import OfflineMessageIndex

    user = int(make_user().user_id)
    old, recent = datetime.utcnow() - timedelta(days=40), datetime.utcnow() - timedelta(hours=1)
    with storage.session() as session:
        session.add_all([
            OfflineMessageIndex(user_id=user, message_id=1, conversation_id="p_1_2", synced=True, synced_at=old),
            OfflineMessageIndex(user_id=user, message_id=2, conversation_id="p_1_2", synced=True, synced_at=recent),
            OfflineMessageIndex(user_id=user, message_id=3, conversation_id="p_1_2", synced=False),
            PushLog(user_id=user, message_id=1, push_type="apns", push_status="success", target="device:1",
                    created_at=old),
            PushLog(user_id=user, message_id=2, push_type="apns", push_status="pending", target="device:1",
                    created_at=old),
            PushLog(user_id=user, message_id=3, push_type="apns", push_status="failed", target="device:1",
                    created_at=recent),
        ])
    for _ in range(2):  # a second run finds nothing more to do
        purge_synced_offline_index(storage, older_than_days=7)
        purge_push_log(storage, older_than_days=30)
    with storage.sessions() as session:
        index = sorted(session.scalars(select(OfflineMessageIndex.message_id).where(
            OfflineMessageIndex.user_id == user)).all())
        logs = sorted(session.scalars(select(PushLog.message_id).where(PushLog.user_id == user)).all())
    assert index == [2, 3] and logs == [2, 3]  # recent, unsynced and still-pending rows stay

    storage.redis.hset(f"unread:{user}", mapping={"_seq": 0, "p_1_2": 99})  # a drifted counter
    assert reconcile_unread(storage) >= 1
    assert storage.redis.hget(f"unread:{user}", "p_1_2") is None  # MySQL says nothing is unread
