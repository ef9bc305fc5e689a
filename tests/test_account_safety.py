"""Account safety end to end, against real gateways and workers: blocks, presence privacy,
moderation with its audit log, data export and account deletion, digest email verification."""
import re
import uuid

import pytest
import requests
import websocket

from tests.harness import ChatClient, flush_redis_keeping_claim, register_and_login, wait_until
from tests.test_accounts import close_code, flask_command
from tests.test_push import add_device, apns_for, make_admin, pushes, settle
from tests.test_sync import sync_all


def call(cluster, user, method, path, gateway=None, **kwargs):
    headers = {"Authorization": f"Bearer {user.token}"} if user is not None else {}
    return requests.request(method, f"{(gateway or cluster.gw1).http}{path}", headers=headers, timeout=20, **kwargs)


def refused(client, to, content="hi", client_msg_id=None):
    answer = client.send_message(to, content, client_msg_id)
    assert answer["type"] == "error", answer
    return answer


# --- blocks -----------------------------------------------------------------------------------

def test_a_blocked_user_cannot_message_the_blocker_with_any_client_msg_id(cluster, make_user, connect):
    alice, mallory = make_user(), make_user()
    assert call(cluster, alice, "PUT", f"/api/blocks/{mallory.user_id}").status_code == 204
    assert call(cluster, alice, "PUT", f"/api/blocks/{mallory.user_id}").status_code == 204  # idempotent
    listed = call(cluster, alice, "GET", "/api/blocks").json()["blocks"]
    assert [(b["user_id"], b["username"]) for b in listed] == [(mallory.user_id, mallory.username)]
    inbox = connect(alice, cluster.gw2)
    sender = connect(mallory, cluster.gw1)
    first = refused(sender, alice.user_id, "let me in", "retry-1")
    assert (first["code"], first["message"]) == ("forbidden", "you cannot message this user")
    # A retry with the same id, with fresh ids, and from the other gateway: refused every time.
    assert refused(sender, alice.user_id, "let me in", "retry-1")["code"] == "forbidden"
    for _ in range(3):
        assert refused(sender, alice.user_id, "new id " + uuid.uuid4().hex)["code"] == "forbidden"
    assert refused(connect(mallory, cluster.gw2), alice.user_id, "other gateway")["code"] == "forbidden"
    # Nothing reached the blocker, live or stored; the blocker may still write to the blocked user.
    assert [f for f in inbox.drain() if f["type"] == "message"] == []
    assert [m for m in sync_all(inbox)[0] if m.get("from") == mallory.user_id] == []
    assert inbox.send_message(mallory.user_id, "stop it")["type"] == "ack"
    # Unblocked: the sender's messages go through again, on both gateways.
    assert call(cluster, alice, "DELETE", f"/api/blocks/{mallory.user_id}").status_code == 204
    ack = sender.send_message(alice.user_id, "sorry", "retry-1")
    assert ack["type"] == "ack"
    inbox.wait_message(ack["msg_id"])
    assert call(cluster, alice, "GET", "/api/blocks").json()["blocks"] == []


def test_block_requests_that_make_no_sense_are_refused(cluster, make_user):
    alice = make_user()
    r = call(cluster, alice, "PUT", f"/api/blocks/{alice.user_id}")
    assert r.status_code == 400 and r.json()["message"] == "you cannot block yourself"
    assert call(cluster, alice, "PUT", "/api/blocks/987654321987").status_code == 404
    assert call(cluster, alice, "PUT", "/api/blocks/abc").status_code == 400
    assert call(cluster, None, "PUT", f"/api/blocks/{alice.user_id}").status_code == 401


def test_a_blocked_user_cannot_add_the_blocker_to_a_group(cluster, make_user):
    alice, mallory, bob = make_user(), make_user(), make_user()
    call(cluster, alice, "PUT", f"/api/blocks/{mallory.user_id}").raise_for_status()
    r = call(cluster, mallory, "POST", "/api/groups", json={"name": "trap", "members": [alice.user_id]})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    group = call(cluster, mallory, "POST", "/api/groups", json={"name": "trap 2", "members": [bob.user_id]}).json()
    r = call(cluster, mallory, "POST", f"/api/groups/{group['group_id']}/members", json={"user_ids": [alice.user_id]})
    assert r.status_code == 403
    members = call(cluster, mallory, "GET", f"/api/groups/{group['group_id']}/members").json()["members"]
    assert alice.user_id not in {m["user_id"] for m in members}
    assert all(c["conversation_id"] != group["conversation_id"]
               for c in call(cluster, alice, "GET", "/api/conversations").json()["conversations"])
    # Anyone else still may add her.
    r = call(cluster, bob, "POST", "/api/groups", json={"name": "friends", "members": [alice.user_id]})
    assert r.status_code == 201


def test_presence_follows_the_privacy_setting_and_blocks(cluster, make_user, connect):
    alice, friend, stranger = make_user(), make_user(), make_user()
    connect(alice)
    assert connect(friend).send_message(alice.user_id, "hi alice")["type"] == "ack"  # now they share a chat
    wait_until(lambda: call(cluster, friend, "GET", f"/api/conversations").json()["conversations"], what="the chat")

    def presence(viewer):
        return call(cluster, viewer, "GET", f"/api/users/{alice.user_id}/presence")

    assert call(cluster, alice, "GET", "/api/privacy").json() == {"presence": "everyone"}
    assert presence(stranger).status_code == 200 and presence(stranger).json()["online"] is True

    assert call(cluster, alice, "PUT", "/api/privacy", json={"presence": "contacts"}).json() == {"presence": "contacts"}
    assert presence(friend).status_code == 200
    hidden = presence(stranger)
    assert hidden.status_code == 403 and hidden.json() == {"error": "forbidden",
                                                           "message": "this user's presence is not visible to you"}

    call(cluster, alice, "PUT", "/api/privacy", json={"presence": "nobody"}).raise_for_status()
    assert presence(friend).status_code == 403 and presence(alice).status_code == 200  # one's own: always

    call(cluster, alice, "PUT", "/api/privacy", json={"presence": "everyone"}).raise_for_status()
    call(cluster, alice, "PUT", f"/api/blocks/{stranger.user_id}").raise_for_status()
    assert presence(stranger).status_code == 403 and presence(friend).status_code == 200
    assert call(cluster, stranger, "GET", "/api/users/987654321987/presence").status_code == 404
    for body in ({"presence": "friends"}, {"presence": None}, {"presence": "everyone", "x": 1}, {}):
        r = call(cluster, alice, "PUT", "/api/privacy", json=body)
        assert r.status_code == 400, body
    assert call(cluster, alice, "GET", "/api/privacy").json() == {"presence": "everyone"}


# --- moderation and audit ---------------------------------------------------------------------

def test_an_admin_removes_a_message_for_everyone_live_and_in_sync(cluster, make_user, connect, storage):
    admin, alice, bob = make_user(), make_user(), make_user()
    make_admin(storage, admin)
    sender, reader = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    ack = sender.send_message(bob.user_id, "something that must go")
    reader.wait_message(ack["msg_id"])
    r = call(cluster, bob, "DELETE", f"/api/admin/messages/{ack['msg_id']}")
    assert r.status_code == 403  # not an admin

    assert call(cluster, admin, "DELETE", f"/api/admin/messages/{ack['msg_id']}").status_code == 204
    for client in (sender, reader):  # live, on both gateways
        frame = client.next_frame(lambda f: f["type"] == "recalled" and f["msg_id"] == ack["msg_id"])
        assert frame["by"] == "admin" and frame["conversation_id"] == ack["conversation_id"]
    # A device that was offline learns it by sync; history shows no content.
    later = ChatClient(cluster.gw1.ws, bob.token)
    try:
        entries = sync_all(later)[0]
    finally:
        later.close()
    [removal] = [e for e in entries if e["type"] == "recalled" and e["msg_id"] == ack["msg_id"]]
    assert removal["by"] == "admin"
    [message] = [e for e in entries if e["type"] == "message" and e["msg_id"] == ack["msg_id"]]
    assert message["content"] == "" and message["status"] == 2
    history = call(cluster, bob, "GET", f"/api/conversations/{ack['conversation_id']}/messages").json()
    assert "something that must go" not in str(history)
    assert call(cluster, admin, "DELETE", "/api/admin/messages/987654321987").status_code == 404

    log = call(cluster, admin, "GET", "/api/admin/audit", params={"action": "message.removed"}).json()
    [entry] = [e for e in log["entries"] if e["target_id"] == ack["msg_id"]]
    assert (entry["actor"], entry["actor_id"], entry["actor_name"], entry["target_type"]) == (
        "admin", admin.user_id, admin.username, "message")
    assert entry["detail"]["sender_id"] == alice.user_id and "must go" not in str(entry)
    assert call(cluster, bob, "GET", "/api/admin/audit").status_code == 403


def test_an_ordinary_recall_says_it_was_the_sender(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    sender, reader = connect(alice), connect(bob)
    ack = sender.send_message(bob.user_id, "oops")
    reader.wait_message(ack["msg_id"])
    sender.send_json({"type": "recall", "msg_id": ack["msg_id"]})
    assert reader.next_frame(lambda f: f["type"] == "recalled")["by"] == "sender"


def test_operator_and_admin_actions_are_in_the_audit_log_newest_first(cluster, services, make_user, storage,
                                                                     connect):
    admin, target = make_user(), make_user()
    make_admin(storage, admin)
    client = connect(target)
    flask_command(services, "disable-user", target.username)
    flask_command(services, "enable-user", target.username)
    assert "is deleted" in flask_command(services, "delete-user", "--yes", target.username)
    assert close_code(client) == 4401
    assert call(cluster, target, "GET", "/api/conversations").status_code == 401
    log = call(cluster, admin, "GET", "/api/admin/audit", params={"per_page": 200}).json()
    mine = [e for e in log["entries"] if e["target_id"] == target.user_id]
    assert [(e["action"], e["actor"], e["actor_id"]) for e in mine] == [
        ("user.deleted", "operator", None), ("user.enabled", "operator", None), ("user.disabled", "operator", None)]
    assert mine[0]["at"] >= mine[1]["at"] >= mine[2]["at"]
    assert call(cluster, admin, "GET", "/api/admin/audit", params={"per_page": 0}).status_code == 400
    # The dashboard has the same log on a page of its own.
    web = requests.Session()
    page = web.post(f"{cluster.gw1.http}/admin/login", data={"username": admin.username, "password": "correct-horse"},
                    timeout=10)
    assert page.status_code == 200
    audit_page = web.get(f"{cluster.gw1.http}/admin/audit", timeout=10)
    assert audit_page.status_code == 200 and "user.disabled" in audit_page.text and target.user_id in audit_page.text


# --- export and deletion ----------------------------------------------------------------------

def test_an_export_holds_the_callers_data_and_only_theirs(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    token = "exporttoken" + uuid.uuid4().hex
    assert call(cluster, alice, "POST", "/api/devices", json={"platform": "ios", "token": token}).status_code == 201
    call(cluster, alice, "PUT", f"/api/blocks/{bob.user_id}").raise_for_status()
    a, b = connect(alice), connect(bob)
    mine = a.send_message(bob.user_id, "alice's words 🌱")
    theirs = b.send_message(alice.user_id, "bob's private words")
    assert mine["type"] == "ack" and theirs["type"] == "error"  # blocked: bob cannot write
    call(cluster, alice, "DELETE", f"/api/blocks/{bob.user_id}").raise_for_status()
    theirs = b.send_message(alice.user_id, "bob's private words")
    a.wait_message(theirs["msg_id"])

    r = call(cluster, alice, "GET", "/api/account/export")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    data = r.json()
    assert data["profile"]["user_id"] == alice.user_id and data["profile"]["username"] == alice.username
    assert [m["content"] for m in data["messages_sent"]] == ["alice's words 🌱"]
    assert [d["token"] for d in data["devices"]] == ["…" + token[-4:]] and token not in r.text
    assert data["privacy"] == {"presence": "everyone"} and data["blocks"] == []
    assert mine["conversation_id"] in {c["conversation_id"] for c in data["conversations"]}
    # Someone else's export: only their own data, whatever they ask for.
    other = call(cluster, bob, "GET", f"/api/account/export?user_id={alice.user_id}").json()
    assert other["profile"]["user_id"] == bob.user_id
    assert [m["content"] for m in other["messages_sent"]] == ["bob's private words"]
    assert "alice's words" not in str(other) and alice.username not in str(other["profile"])
    assert call(cluster, None, "GET", "/api/account/export").status_code == 401


def test_a_deleted_account_is_gone_but_its_messages_stay_for_the_others(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a1, a2 = connect(alice, cluster.gw1), connect(alice, cluster.gw2)
    b = connect(bob, cluster.gw2)
    ack = a1.send_message(bob.user_id, "remember me")
    b.wait_message(ack["msg_id"])
    group = call(cluster, alice, "POST", "/api/groups", json={"name": "alice's", "members": [bob.user_id]}).json()

    wrong = call(cluster, alice, "DELETE", "/api/account", json={"password": "not-my-password"})
    assert wrong.status_code == 403 and call(cluster, alice, "GET", "/api/conversations").status_code == 200
    assert call(cluster, alice, "DELETE", "/api/account", json={}).status_code == 400
    assert call(cluster, alice, "DELETE", "/api/account", json={"password": "correct-horse"}).status_code == 204

    assert close_code(a1) == 4401 and close_code(a2) == 4401  # both gateways, at once
    assert call(cluster, alice, "GET", "/api/conversations").status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as no_socket:
        ChatClient(cluster.gw1.ws, alice.token)
    assert no_socket.value.status_code == 401
    login = requests.post(f"{cluster.gw1.http}/api/auth/login",
                          json={"username": alice.username, "password": "correct-horse"}, timeout=10)
    assert login.status_code == 401
    taken = requests.post(f"{cluster.gw1.http}/api/auth/register",
                          json={"username": alice.username, "password": "another-horse"}, timeout=10)
    assert taken.status_code == 409  # reserved for USERNAME_REUSE_DAYS
    assert call(cluster, bob, "GET", "/api/users", params={"username": alice.username}).status_code == 404

    # Bob keeps the message, from a "deleted user"; the group is his now.
    history = call(cluster, bob, "GET", f"/api/conversations/{ack['conversation_id']}/messages").json()
    assert "remember me" in str(history)
    assert call(cluster, bob, "GET", f"/api/users/{alice.user_id}").json() == {
        "user_id": alice.user_id, "username": "deleted user", "deleted": True}
    [peer] = [c["peer"] for c in call(cluster, bob, "GET", "/api/conversations").json()["conversations"]
              if c["conversation_id"] == ack["conversation_id"]]
    assert peer == {"user_id": alice.user_id, "username": "deleted user", "deleted": True}
    members = call(cluster, bob, "GET", f"/api/groups/{group['group_id']}/members").json()["members"]
    assert [(m["user_id"], m["role"]) for m in members] == [(bob.user_id, "owner")]
    assert b.send_message(alice.user_id, "are you there?")["code"] == "not_found"
    assert call(cluster, bob, "GET", f"/api/users/{alice.user_id}/presence").status_code == 404
    admin = make_user()
    make_admin(storage, admin)
    log = call(cluster, admin, "GET", "/api/admin/audit", params={"action": "user.deleted"}).json()["entries"]
    [entry] = [e for e in log if e["target_id"] == alice.user_id]
    assert (entry["actor"], entry["actor_id"]) == ("user", alice.user_id) and "correct-horse" not in str(entry)


def test_a_deleted_username_is_free_again_after_the_reuse_period(cluster, make_user, storage):
    from sqlalchemy import update

    from models import UsernameReservation

    gone = make_user()
    call(cluster, gone, "DELETE", "/api/account", json={"password": "correct-horse"}).raise_for_status()
    with storage.session() as session:  # the period is over
        session.execute(update(UsernameReservation).where(UsernameReservation.username == gone.username)
                        .values(until_ms=1))
    again = register_and_login(cluster.gw1.http, gone.username)
    assert again.user_id != gone.user_id


# --- digest email verification ----------------------------------------------------------------

def mailed_code(cluster, address, count=1):
    mails = wait_until(lambda: len(cluster.fakes.smtp.mails_to(address)) >= count and cluster.fakes.smtp.mails_to(
        address), what=f"mail {count} to {address}")
    return re.search(r"code is ([0-9]{6})", mails[count - 1].get_content()).group(1)


def test_a_digest_address_gets_mail_only_after_its_owner_confirmed_it(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    address = f"bob-{bob.user_id}@example.org"
    token = add_device(storage, bob, "ios")  # a signal that bob's pushes were planned
    saved = call(cluster, bob, "PUT", "/api/push-settings", json={"email": address})
    assert saved.status_code == 200 and saved.json()["email_verified"] is False
    code = mailed_code(cluster, address)
    [mail] = cluster.fakes.smtp.mails_to(address)
    assert "confirm" in mail["Subject"].lower() and code not in saved.text

    # Unconfirmed: the push to bob's phone goes out, no digest is planned or mailed.
    ack = connect(alice).send_message(bob.user_id, "digest me?")
    wait_until(lambda: apns_for(cluster.fakes, token), timeout=20, what="the device push")
    settle(storage, bob)
    assert [p.push_type for p in pushes(storage, bob)] == ["apns"]
    assert not storage.redis.exists(f"push:digest:{bob.user_id}")
    assert len(cluster.fakes.smtp.mails_to(address)) == 1  # only the verification mail

    wrong = "000000" if code != "000000" else "111111"
    r = call(cluster, bob, "POST", "/api/push-settings/email/verify", json={"code": wrong})
    assert r.status_code == 403 and r.json()["message"] == "wrong code"
    for body in ({"code": "12345"}, {"code": 123456}, {}, {"code": code, "x": 1}):
        assert call(cluster, bob, "POST", "/api/push-settings/email/verify", json=body).status_code == 400, body
    assert call(cluster, bob, "GET", "/api/push-settings").json()["email_verified"] is False
    r = call(cluster, bob, "POST", "/api/push-settings/email/verify", json={"code": code})
    assert r.status_code == 200 and r.json()["email_verified"] is True and r.json()["email"] == address

    # Confirmed: the next unread message is mailed as a digest.
    later = connect(alice).send_message(bob.user_id, "now you get mail")
    wait_until(lambda: len(cluster.fakes.smtp.mails_to(address)) == 2, timeout=20, what="the digest mail")
    digest = cluster.fakes.smtp.mails_to(address)[1]
    assert "unread message" in digest["Subject"] and "now you get mail" in digest.get_content()
    assert ack["type"] == later["type"] == "ack"

    # Another address is unconfirmed again; the old code does not confirm it.
    other = f"bob2-{bob.user_id}@example.org"
    assert call(cluster, bob, "PUT", "/api/push-settings", json={"email": other}).json()["email_verified"] is False
    new_code = mailed_code(cluster, other)
    if new_code != code:
        assert call(cluster, bob, "POST", "/api/push-settings/email/verify", json={"code": code}).status_code == 403
    # Saving the same address again (verified already) sends nothing new.
    assert call(cluster, bob, "POST", "/api/push-settings/email/verify", json={"code": new_code}).status_code == 200
    call(cluster, bob, "PUT", "/api/push-settings", json={"email": other}).raise_for_status()
    assert len(cluster.fakes.smtp.mails_to(other)) == 1


def test_a_verification_code_cannot_be_guessed(cluster, make_user):
    carol = make_user()
    address = f"carol-{carol.user_id}@example.org"
    assert call(cluster, carol, "POST", "/api/push-settings/email/verify", json={"code": "123456"}).status_code == 409
    call(cluster, carol, "PUT", "/api/push-settings", json={"email": address}).raise_for_status()
    code = mailed_code(cluster, address)
    wrong = [f"{(int(code) + i) % 10**6:06d}" for i in range(1, 6)]
    for guess in wrong:
        assert call(cluster, carol, "POST", "/api/push-settings/email/verify", json={"code": guess}).status_code == 403
    r = call(cluster, carol, "POST", "/api/push-settings/email/verify", json={"code": code})
    assert r.status_code == 403 and "too often" in r.json()["message"]  # the right code, too late
    # A new code (the same address saved again) works; mails per account are limited.
    call(cluster, carol, "PUT", "/api/push-settings", json={"email": address}).raise_for_status()
    assert call(cluster, carol, "POST", "/api/push-settings/email/verify",
                json={"code": mailed_code(cluster, address, 2)}).json()["email_verified"] is True
    answers = [call(cluster, carol, "PUT", "/api/push-settings", json={"email": f"x{i}-{address}"}).status_code
               for i in range(4)]
    assert answers[-1] == 429 and set(answers) <= {200, 429}
    assert call(cluster, carol, "GET", "/api/push-settings").json()["email"] != f"x3-{address}"


# --- last: a Redis that lost its data ---------------------------------------------------------

def test_a_block_holds_after_redis_lost_its_data(cluster, make_user, connect, storage):
    alice, mallory = make_user(), make_user()
    call(cluster, alice, "PUT", f"/api/blocks/{mallory.user_id}").raise_for_status()
    sender = connect(mallory, cluster.gw2)
    assert refused(sender, alice.user_id)["code"] == "forbidden"  # the list is in Redis now
    flush_redis_keeping_claim(storage.redis)
    answer = refused(sender, alice.user_id, "redis forgot?")
    assert answer["code"] == "forbidden"  # read from MySQL, never let through
    assert refused(connect(mallory, cluster.gw1), alice.user_id, "and here?")["code"] == "forbidden"
    r = call(cluster, mallory, "POST", "/api/groups", json={"name": "trap", "members": [alice.user_id]})
    assert r.status_code == 403
