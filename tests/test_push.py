"""Offline push end to end: real workers, real local APNs / FCM / SMTP servers."""
import itertools
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import select, update

from app.push.planning import PRIORITY_DIGEST, PRIORITY_PRIVATE
from models import STATUS_READ, STATUS_UNREAD, Device, Message, PushLog, User
from tests.fakes.fcm_server import make_device_token as fcm_token
from tests.harness import wait_until


def add_device(storage, user, platform="ios"):
    token = secrets.token_hex(32) if platform == "ios" else fcm_token()
    with storage.session() as session:
        session.add(Device(user_id=int(user.user_id), platform=platform, token=token))
    return token


def pushes(storage, user):
    with storage.sessions() as session:
        return session.scalars(select(PushLog).where(PushLog.user_id == int(user.user_id))
                               .order_by(PushLog.id)).all()


def statuses(storage, user):
    return [p.push_status for p in pushes(storage, user)]


def apns_for(fakes, token):
    return [r for r in fakes.apns.notifications if r.token == token]


def settle(storage, user):
    """Wait until the coalesced push planner has run for this user."""
    wait_until(lambda: not storage.redis.exists(f"push:coalesce:{user.user_id}"), timeout=15,
               what="the push planner to run")


def verified_digest_email(cluster, user, address, **settings):
    """Save a digest address (and other settings) and confirm it with the code mailed to it."""
    headers = {"Authorization": f"Bearer {user.token}"}
    r = requests.put(f"{cluster.gw1.http}/api/push-settings", json={"email": address, **settings}, headers=headers,
                     timeout=10)
    assert r.status_code == 200 and r.json()["email_verified"] is False, r.text
    [mail] = cluster.fakes.smtp.mails_to(address)  # sent before the answer
    code = re.search(r"code is ([0-9]{6})", mail.get_content()).group(1)
    r = requests.post(f"{cluster.gw1.http}/api/push-settings/email/verify", json={"code": code}, headers=headers,
                      timeout=10)
    assert r.status_code == 200 and r.json()["email_verified"] is True, r.text
    with cluster.fakes.smtp.lock:  # the digest tests count the mails that follow
        cluster.fakes.smtp.mails.remove(mail)


def make_admin(storage, user):
    with storage.session() as session:
        session.execute(update(User).where(User.id == int(user.user_id)).values(is_admin=True))


def test_an_ios_push_carries_the_message_badge_thread_and_collapse_id(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    ack = connect(alice).send_message(bob.user_id, "are we still on for lunch?")
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="the push")
    [note] = apns_for(cluster.fakes, token)
    aps = note.payload["aps"]
    assert aps["alert"]["body"] == "are we still on for lunch?" and aps["alert"]["title"] == alice.username
    assert aps["badge"] == 1 and aps["thread-id"] == ack["conversation_id"]
    assert note.payload["msg_id"] == ack["msg_id"]
    assert note.headers["apns-collapse-id"] == ack["conversation_id"] and note.headers["apns-priority"] == "10"
    assert note.headers["apns-push-type"] == "alert" and note.headers["apns-topic"] == cluster.fakes.apns.topic
    push = pushes(storage, bob)[0]
    assert push.push_time is not None and push.attempts == 1 and push.provider_id


def test_an_android_push_goes_through_fcm_and_preview_off_hides_the_text(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "android")
    r = requests.put(f"{cluster.gw1.http}/api/push-settings", json={"preview": False},
                     headers={"Authorization": f"Bearer {bob.token}"}, timeout=10)
    assert r.status_code == 200
    ack = connect(alice).send_message(bob.user_id, "secret plans")
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="the push")
    [message] = [m for m in cluster.fakes.fcm.messages if m["token"] == token]
    assert "secret plans" not in str(message)
    assert message["android"]["collapse_key"] == ack["conversation_id"]
    assert message["android"]["notification"]["notification_count"] == 1
    assert message["data"]["msg_id"] == ack["msg_id"]


def test_an_email_digest_arrives_once_for_a_burst(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    address = f"bob-{bob.user_id}@example.org"
    verified_digest_email(cluster, bob, address)
    a = connect(alice)
    for i in range(3):
        a.send_message(bob.user_id, f"note {i}")
    wait_until(lambda: cluster.fakes.smtp.mails_to(address), timeout=20, what="the digest mail")
    [mail] = cluster.fakes.smtp.mails_to(address)
    assert "3 unread messages" in mail["Subject"] and "note 2" in mail.get_content()
    assert [(p.push_type, p.push_status, p.priority) for p in pushes(storage, bob)] == [
        ("email", "success", PRIORITY_DIGEST)]


def test_a_burst_to_an_offline_user_becomes_one_push_with_the_latest_message(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    a = connect(alice)
    acks = [a.send_message(bob.user_id, f"burst {i}") for i in range(8)]
    settle(storage, bob)
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="one push")
    [note] = apns_for(cluster.fakes, token)
    assert note.payload["msg_id"] == acks[-1]["msg_id"] and note.payload["aps"]["badge"] == 8


def test_gone_token_is_removed_and_never_retried(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    cluster.fakes.apns.fail_token(token, 410, "Unregistered")
    connect(alice).send_message(bob.user_id, "hello?")
    wait_until(lambda: statuses(storage, bob) == ["failed"], timeout=15, what="the failed push")
    push = pushes(storage, bob)[0]
    assert push.attempts == 1 and "Unregistered" in push.error_msg
    with storage.sessions() as session:
        assert session.scalars(select(Device).where(Device.token == token)).all() == []
    assert len([r for r in cluster.fakes.apns.requests if r.token == token]) == 1


def test_503_with_retry_after_is_retried_after_that_delay_then_succeeds(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    token = add_device(storage, bob, "ios")
    cluster.fakes.apns.fail_token(token, 503, "ServiceUnavailable")
    connect(alice).send_message(bob.user_id, "try again")
    wait_until(lambda: pushes(storage, bob) and pushes(storage, bob)[0].attempts >= 1, timeout=15,
               what="the first attempt")
    failed_at = time.monotonic()
    cluster.fakes.apns.reset()
    cluster.fakes.apns.fail_next(1, 503, "ServiceUnavailable", retry_after=1)
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=20, what="the retried push")
    push = pushes(storage, bob)[0]
    assert push.attempts == 3 and len(apns_for(cluster.fakes, token)) == 1
    assert time.monotonic() - failed_at >= 1.0  # the second retry waited for Retry-After


def test_a_permanent_400_fails_at_once_and_an_admin_retry_succeeds_later(cluster, make_user, connect, storage):
    alice, bob, admin, nobody = make_user(), make_user(), make_user(), make_user()
    make_admin(storage, admin)
    token = add_device(storage, bob, "ios")
    cluster.fakes.apns.fail_token(token, 400, "BadExpirationDate")
    connect(alice).send_message(bob.user_id, "please arrive")
    wait_until(lambda: statuses(storage, bob) == ["failed"], timeout=15, what="the failed push")
    push = pushes(storage, bob)[0]
    assert push.attempts == 1 and "BadExpirationDate" in push.error_msg

    api = f"{cluster.gw1.http}/api/admin/pushes"
    as_admin = {"Authorization": f"Bearer {admin.token}"}
    assert requests.get(api, headers={"Authorization": f"Bearer {nobody.token}"}).status_code == 403
    assert requests.post(f"{api}/{push.id}/retry", headers={"Authorization": f"Bearer {nobody.token}"}).status_code == 403
    listed = requests.get(api, params={"status": "failed", "user_id": bob.user_id, "provider": "apns"},
                          headers=as_admin).json()
    assert [p["id"] for p in listed["pushes"]] == [str(push.id)] and listed["pushes"][0]["error"]

    cluster.fakes.apns.reset()  # the provider is healthy again
    r = requests.post(f"{api}/{push.id}/retry", headers=as_admin)
    assert r.status_code == 202
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="the retried push")
    assert len(apns_for(cluster.fakes, token)) == 1
    assert requests.post(f"{api}/{push.id}/retry", headers=as_admin).status_code == 409  # already delivered


def test_retry_all_matching_and_the_cli_resend_failed_pushes(cluster, make_user, connect, storage, services):
    alice, bob, carol, admin = make_user(), make_user(), make_user(), make_user()
    make_admin(storage, admin)
    tokens = {u.user_id: add_device(storage, u, "ios") for u in (bob, carol)}
    for u in (bob, carol):
        cluster.fakes.apns.fail_token(tokens[u.user_id], 400, "BadExpirationDate")
        connect(alice).send_message(u.user_id, "hi")
    wait_until(lambda: statuses(storage, bob) == ["failed"] and statuses(storage, carol) == ["failed"], timeout=15,
               what="two failed pushes")
    cluster.fakes.apns.reset()
    r = requests.post(f"{cluster.gw1.http}/api/admin/pushes/retry", json={"user_id": bob.user_id},
                      headers={"Authorization": f"Bearer {admin.token}"})
    assert r.status_code == 202 and r.json()["retried"] == 1
    wait_until(lambda: statuses(storage, bob) == ["success"], timeout=15, what="Bob's retried push")
    assert statuses(storage, carol) == ["failed"]
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "retry-pushes", "--user", carol.user_id],
                            env=services.env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "queued 1 push(es)" in result.stdout, result.stderr
    wait_until(lambda: statuses(storage, carol) == ["success"], timeout=15, what="Carol's retried push")


def test_a_message_read_on_another_device_before_its_push_is_not_pushed(cluster, make_user, connect, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    token = add_device(storage, bob, "ios")
    cluster.push.signal(signal.SIGSTOP)  # the push is held back, however slow this machine is
    try:
        ack = connect(alice).send_message(bob.user_id, "read me elsewhere")
        wait_until(lambda: storage.redis.exists(f"push:coalesce:{bob.user_id}"), what="the push to be scheduled")
        laptop = connect(bob, cluster.gw2)
        laptop.send_json({"type": "read", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
        laptop.next_frame(lambda f: f["type"] == "read_ok")
        laptop.close()
        wait_until(lambda: not storage.redis.hlen(f"online:user:{bob.user_id}"), what="Bob offline again")
        control = connect(carol).send_message(bob.user_id, "and this one is unread")
    finally:
        cluster.push.signal(signal.SIGCONT)
    # Bob's planner runs for both messages: only the unread one may be pushed.
    wait_until(lambda: apns_for(cluster.fakes, token), timeout=15, what="the push of the unread message")
    assert [n.payload["msg_id"] for n in apns_for(cluster.fakes, token)] == [control["msg_id"]]


def test_muted_conversations_and_do_not_disturb_hours_get_no_push(cluster, make_user, connect, storage):
    alice, carol, bob = make_user(), make_user(), make_user()
    token = add_device(storage, bob, "ios")
    headers = {"Authorization": f"Bearer {bob.token}"}
    muted = connect(alice).send_message(bob.user_id, "muted chatter")
    requests.put(f"{cluster.gw1.http}/api/push-settings", json={"muted_conversations": [muted["conversation_id"]]},
                 headers=headers, timeout=10).raise_for_status()
    settle(storage, bob)
    assert apns_for(cluster.fakes, token) == []
    # Quiet hours around now, in Bob's time zone.
    now = time.gmtime()
    start, end = f"{(now.tm_hour - 1) % 24:02d}:00", f"{(now.tm_hour + 2) % 24:02d}:00"
    requests.put(f"{cluster.gw1.http}/api/push-settings", json={"do_not_disturb": {"start": start, "end": end},
                 "time_zone": "UTC"}, headers=headers, timeout=10).raise_for_status()
    connect(carol).send_message(bob.user_id, "during quiet hours")
    settle(storage, bob)
    assert apns_for(cluster.fakes, token) == []
    requests.put(f"{cluster.gw1.http}/api/push-settings", json={"do_not_disturb": None}, headers=headers,
                 timeout=10).raise_for_status()
    later = connect(carol).send_message(bob.user_id, "quiet hours are over")
    wait_until(lambda: apns_for(cluster.fakes, token), timeout=15, what="a push after quiet hours")
    [note] = apns_for(cluster.fakes, token)
    assert note.payload["msg_id"] == later["msg_id"]  # the newest message outside the muted conversation


def test_a_private_push_overtakes_a_backlog_of_digest_priority_pushes(cluster, make_user, storage):
    from tasks.publish import DELIVER_PUSH, queue_push_task

    people = [make_user() for _ in range(13)]
    tokens = [add_device(storage, u, "ios") for u in people]
    cluster.push.kill()  # nothing consumes push_tasks while the backlog builds
    try:
        for push_id, priority in digest_backlog_then_a_private_push(storage, people, tokens):
            queue_push_task(DELIVER_PUSH, [push_id], priority)
    finally:
        cluster.ensure_push_worker()
    wait_until(lambda: all(apns_for(cluster.fakes, t) for t in tokens), timeout=30, what="all 13 pushes")
    order = [r.token for r in cluster.fakes.apns.notifications if r.token in tokens]
    assert order.index(tokens[12]) <= 1  # the private push went first (or second, behind one already taken)


def digest_backlog_then_a_private_push(storage, people, tokens) -> list[tuple[int, int]]:
    """Pending push_log rows, one per person's device: digest priority for all but the
    last, which is a private push. Returns (push id, priority) in that order."""
    with storage.session() as session:
        device_ids = {d.token: d.id for d in session.scalars(select(Device).where(Device.token.in_(tokens)))}
    base_id = int(time.time() * 1000) << 22
    rows = []
    with storage.session() as session:
        for i, (user, token) in enumerate(zip(people, tokens)):
            session.add(Message(id=base_id + i, conversation_id=f"p_1_{user.user_id}", sender_id=1,
                                receiver_id=int(user.user_id), client_msg_id=f"prio-{base_id + i}", content=f"b{i}",
                                timestamp=int(time.time() * 1000)))
            row = PushLog(user_id=int(user.user_id), message_id=base_id + i, push_type="apns", push_status="pending",
                          target=f"device:{device_ids[token]}", device_id=device_ids[token],
                          priority=PRIORITY_PRIVATE if i == len(people) - 1 else PRIORITY_DIGEST,
                          payload={"title": "t", "body": f"b{i}", "badge": 1, "conversation_id": f"p_1_{i}",
                                   "msg_id": str(base_id + i), "preview": True})
            session.add(row)
            session.flush()
            rows.append((row.id, row.priority))
    return rows


def test_a_push_of_a_message_recalled_meanwhile_is_skipped_even_on_an_admin_retry(cluster, make_user, connect,
                                                                                  storage):
    alice, bob, admin = make_user(), make_user(), make_user()
    make_admin(storage, admin)
    token = add_device(storage, bob, "ios")
    cluster.fakes.apns.fail_token(token, 400, "BadExpirationDate")
    a = connect(alice)
    ack = a.send_message(bob.user_id, "I should not have said that")
    wait_until(lambda: statuses(storage, bob) == ["failed"], timeout=15, what="the failed push")
    a.send_json({"type": "recall", "msg_id": ack["msg_id"]})
    a.next_frame(lambda f: f["type"] == "recalled")
    cluster.fakes.apns.reset()
    push = pushes(storage, bob)[0]
    r = requests.post(f"{cluster.gw1.http}/api/admin/pushes/{push.id}/retry",
                      headers={"Authorization": f"Bearer {admin.token}"}, timeout=10)
    assert r.status_code == 202
    wait_until(lambda: statuses(storage, bob) == ["skipped"], timeout=15, what="the skipped retry")
    assert "recalled" in pushes(storage, bob)[0].error_msg and apns_for(cluster.fakes, token) == []


def test_bulk_retry_needs_an_explicit_filter_body(cluster, make_user, storage):
    admin = make_user()
    make_admin(storage, admin)
    api, headers = f"{cluster.gw1.http}/api/admin/pushes/retry", {"Authorization": f"Bearer {admin.token}"}
    assert requests.post(api, data="user_id=5", headers=headers, timeout=10).status_code == 400
    assert requests.post(api, json={"user_id": True}, headers=headers, timeout=10).status_code == 400


def test_a_digest_due_in_quiet_hours_waits_until_they_end(cluster, make_user, connect, storage):
    from datetime import datetime, timedelta, timezone

    from app.push.planning import DIGEST_KEY, plan_digest

    alice, bob = make_user(), make_user()
    address = f"bob-{bob.user_id}@example.org"
    now = datetime.now(timezone.utc)
    start, end = (now - timedelta(hours=1)).strftime("%H:00"), (now + timedelta(hours=2)).strftime("%H:00")
    verified_digest_email(cluster, bob, address, do_not_disturb={"start": start, "end": end}, time_zone="UTC")
    connect(alice).send_message(bob.user_id, "sent at night")
    key = DIGEST_KEY.format(bob.user_id)
    # The digest task ran and put itself off until the quiet hours end (its key held that long).
    wait_until(lambda: storage.redis.ttl(key) > 3600, timeout=20, what="the digest deferred")
    assert cluster.fakes.smtp.mails_to(address) == [] and pushes(storage, bob) == []
    ends = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    deferred = plan_digest(storage, int(bob.user_id), now=now)
    assert deferred.push_id is None and abs(deferred.defer_seconds - (ends - now).total_seconds()) < 1
    after = plan_digest(storage, int(bob.user_id), now=ends + timedelta(minutes=1))  # what runs when they end
    assert after.push_id is not None and after.defer_seconds is None


# -- batched delivery (deliver_push tasks are attempted in batches: app.push.attempts.attempt_pushes) --------------

_ids = itertools.count((int(time.time() * 1000) << 22) + secrets.randbelow(1 << 20))


@dataclass
class Pending:
    id: int
    token: str
    user: object


def pending_push(storage, user, status=STATUS_UNREAD, platform="ios"):
    """An iOS device of `user`, a private message to them (unread, or read: status 1) and its pending push_log row,
    as send_push leaves them."""
    token = add_device(storage, user, platform)
    msg_id = next(_ids)
    with storage.session() as session:
        device_id = session.scalar(select(Device.id).where(Device.token == token))
        session.add(Message(id=msg_id, conversation_id=f"p_1_{user.user_id}", sender_id=1,
                            receiver_id=int(user.user_id), client_msg_id=f"batch-{msg_id}", content="batched",
                            timestamp=int(time.time() * 1000), status=status))
        row = PushLog(user_id=int(user.user_id), message_id=msg_id, push_type="apns" if platform == "ios" else "fcm",
                      push_status="pending", target=f"device:{device_id}", device_id=device_id,
                      priority=PRIORITY_PRIVATE, payload={"title": "alice", "body": "batched", "badge": 1,
                                                          "conversation_id": f"p_1_{user.user_id}",
                                                          "msg_id": str(msg_id), "preview": True})
        session.add(row)
        session.flush()
        return Pending(row.id, token, user)


def row_of(storage, push):
    with storage.sessions() as session:
        return session.get(PushLog, push.id)


def test_one_batch_mixes_delivered_dead_token_temporary_failure_read_and_moved_device(cluster, make_user, storage):
    from app.config import Settings
    from app.push.providers.apns import ApnsClient
    from app.push.attempts import attempt_pushes

    apns = cluster.fakes.apns
    users = [make_user() for _ in range(5)]
    ok, dead, busy, read, moved = [pending_push(storage, u, status=STATUS_READ if i == 3 else STATUS_UNREAD)
                                   for i, u in enumerate(users)]
    apns.fail_token(dead.token, 410, "Unregistered")
    apns.fail_token(busy.token, 503, "ServiceUnavailable")
    with storage.session() as session:  # this device now belongs to someone else
        session.execute(update(Device).where(Device.token == moved.token).values(user_id=int(users[0].user_id)))
    batch = [(p.id, 0) for p in (ok, dead, busy, read, moved)]
    queued = []
    settings = Settings(**{name.lower(): value for name, value in apns.env().items()})
    with ApnsClient(settings) as client:
        providers = {"apns": client}
        results = attempt_pushes(storage, batch, providers, max_retries=3, base_delay=10.0,
                                 before_commit=lambda attempted: queued.append(dict(attempted)))

        assert {p.id: (results[p.id].status, results[p.id].attempts) for p in (ok, dead, busy, read, moved)} == {
            ok.id: ("success", 1), dead.id: ("failed", 1), busy.id: ("pending", 1), read.id: ("skipped", 0),
            moved.id: ("failed", 1)}
        assert [r.token for r in apns.requests if r.token in {p.token for p in (ok, dead, busy, read, moved)}] \
            .count(read.token) == 0  # read meanwhile: never sent
        assert row_of(storage, ok).provider_id and row_of(storage, ok).push_time is not None
        assert "dead token removed: Unregistered" == row_of(storage, dead).error_msg
        with storage.sessions() as session:
            assert session.scalar(select(Device.id).where(Device.token == dead.token)) is None  # removed at once
            assert session.scalar(select(Device.id).where(Device.token == moved.token)) is not None
        assert row_of(storage, busy).error_msg.startswith("retrying in ")
        assert row_of(storage, read).error_msg == "message read before the push went out"
        assert row_of(storage, moved).error_msg == "device removed before the push was sent"
        # The retry was handed over before the commit, with the attempt it is for and the backoff.
        [attempted] = queued
        assert attempted[busy.id].retry_in >= 5 and attempted[busy.id].attempts == 1
        assert [r.retry_in is None for pid, r in attempted.items() if pid != busy.id] == [True] * 4

        # The same batch again, as a redelivered batch brings it: nothing is sent twice, nothing changes.
        sent = len(apns.requests)
        again = attempt_pushes(storage, batch, providers, max_retries=3, base_delay=10.0,
                               before_commit=queued.append)
        assert all(r.stale for r in again.values()) and len(apns.requests) == sent and len(queued) == 1
        assert (row_of(storage, busy).push_status, row_of(storage, busy).attempts) == ("pending", 1)

        # The retry, queued for attempt 1, goes out; a second copy of it then finds nothing to do.
        apns.fail_token(busy.token, 200, None)  # Apple answers this device 200 again
        retried = attempt_pushes(storage, [(busy.id, 1), (busy.id, 1)], providers, max_retries=3, base_delay=10.0)
        assert (retried[busy.id].status, retried[busy.id].attempts) == ("success", 2)
        assert attempt_pushes(storage, [(busy.id, 1)], providers, max_retries=3, base_delay=10.0)[busy.id].stale
    assert [r.status for r in apns.requests if r.token == busy.token] == [503, 200]


def test_deliveries_queued_twice_are_sent_once_and_a_retry_still_goes_out(cluster, make_user, storage):
    from tasks.publish import queue_push_delivery as queue_delivery

    apns = cluster.fakes.apns
    pushes = [pending_push(storage, make_user()) for _ in range(4)]
    tokens = {p.token for p in pushes}
    cluster.push.kill()  # nothing consumes push_tasks while the deliveries are queued
    try:
        for push in pushes + pushes:  # every delivery twice: what a redelivered batch brings back
            queue_delivery(push.id, PRIORITY_PRIVATE)
        apns.fail_next(1, 503, "ServiceUnavailable", retry_after=1)  # the first request of the batch
    finally:
        cluster.ensure_push_worker()
    wait_until(lambda: all(row_of(storage, p).push_status == "success" for p in pushes), timeout=30,
               what="all four pushes delivered")
    mine = [r for r in apns.requests if r.token in tokens]
    assert sorted(r.status for r in mine) == [200, 200, 200, 200, 503]  # one retry, nothing twice
    assert sorted(row_of(storage, p).attempts for p in pushes) == [1, 1, 1, 2]
    time.sleep(1.5)  # nothing else was waiting to go out
    assert len([r for r in apns.requests if r.token in tokens]) == 5


def test_a_push_worker_killed_mid_batch_loses_nothing_and_sends_each_push_once(real_services, cluster, make_user,
                                                                                storage):
    import pymysql
    from sqlalchemy.engine import make_url

    from tasks.publish import queue_push_delivery as queue_delivery

    apns = cluster.fakes.apns
    pushes = [pending_push(storage, make_user()) for _ in range(6)]
    tokens = {p.token for p in pushes}
    apns.delay_next(6, seconds=5)  # Apple holds the answers: the worker waits for them mid-batch
    for push in pushes:
        queue_delivery(push.id, PRIORITY_PRIVATE)
    try:
        wait_until(lambda: apns.held, timeout=15, what="a batch's requests at Apple")
        url = make_url(real_services.database_url)
        probe = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username,
                                password=url.password or "", database=url.database)
        try:  # the batch holds its rows while it sends: another delivery of them would have to wait
            with probe.cursor() as cur, pytest.raises(pymysql.err.OperationalError, match="[Ll]ock"):
                cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
                cur.execute(f"SELECT id FROM push_log WHERE id IN ({','.join(str(p.id) for p in pushes)}) "
                            "FOR UPDATE")
        finally:
            probe.close()
        cluster.push.kill()
    finally:
        cluster.ensure_push_worker()  # RabbitMQ gives the unacknowledged deliveries to the new worker
    wait_until(lambda: all(row_of(storage, p).push_status == "success" for p in pushes), timeout=30,
               what="every push delivered after the crash")
    assert [row_of(storage, p).attempts for p in pushes] == [1] * 6  # the killed attempt was rolled back
    accepted = [r.token for r in apns.notifications if r.token in tokens]
    assert sorted(accepted) == sorted(tokens)  # the answers the killed worker never got are not counted
