"""Group chat end to end: membership, fan-out across gateways in chunks, offline
members, sync, unread, receipts, mute, removal, recall rules, redelivery."""
import secrets
import signal
import time

import pytest
import requests
from sqlalchemy import select

from app.chat.group_messages import fan_out_group_message
from app.push.planning import PRIORITY_GROUP
from app.chat.recall import recall_message
from app.errors import Forbidden, RecallExpired
from app.chat.unread import UNREAD_KEY, unread_counts
from models import ENTRY_MESSAGE, Device, Message, OfflineMessageIndex, PushLog, SyncEntry
from tests.harness import wait_until
from tests.test_sync import sync_all


class Api:
    def __init__(self, base_url, user):
        self.base, self.user = base_url, user

    def __call__(self, method, path, **kwargs):
        return requests.request(method, f"{self.base}{path}", headers={"Authorization": f"Bearer {self.user.token}"},
                                timeout=10, **kwargs)


@pytest.fixture
def api(cluster):
    return lambda user: Api(cluster.gw1.http, user)


def make_group(api, owner, members, name="Team"):
    r = api(owner)("POST", "/api/groups", json={"name": name, "members": [m.user_id for m in members]})
    assert r.status_code == 201, r.text
    return r.json()


def group_send(client, group_id, content, client_msg_id=None):
    cmid = client_msg_id or secrets.token_hex(8)
    client.send_json({"type": "send", "client_msg_id": cmid, "group_id": group_id, "content": content})
    return client.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"))


def stream_entries(storage, user, msg_id):
    with storage.sessions() as session:
        return session.scalars(select(SyncEntry.kind).where(
            SyncEntry.user_id == int(user.user_id), SyncEntry.message_id == int(msg_id))).all()


def add_ios_device(storage, user):
    token = secrets.token_hex(32)
    with storage.session() as session:
        session.add(Device(user_id=int(user.user_id), platform="ios", token=token))
    return token


def test_groups_rest_create_list_members_and_errors(cluster, make_user, api):
    owner, bob, carol, outsider = make_user(), make_user(), make_user(), make_user()
    created = make_group(api, owner, [bob, carol], name="  Launch 🚀 ")
    gid = created["group_id"]
    assert isinstance(gid, str) and created["conversation_id"] == f"g_{gid}"
    [mine] = [g for g in api(bob)("GET", "/api/groups").json()["groups"] if g["group_id"] == gid]
    assert (mine["name"], mine["role"], mine["member_count"]) == ("Launch 🚀", "member", 3)
    members = api(carol)("GET", f"/api/groups/{gid}/members").json()["members"]
    assert {(m["user_id"], m["role"]) for m in members} == {
        (owner.user_id, "owner"), (bob.user_id, "member"), (carol.user_id, "member")}
    # The group is in every member's conversation list at once, before any message.
    listed = api(bob)("GET", "/api/conversations").json()["conversations"]
    [item] = [c for c in listed if c["conversation_id"] == created["conversation_id"]]
    assert item["is_group"] and item["group"] == {"name": "Launch 🚀", "member": True} and item["unread"] == 0

    assert api(outsider)("GET", f"/api/groups/{gid}/members").status_code == 403
    assert api(outsider)("GET", "/api/groups/999999999/members").status_code == 404
    for body, status in [({"name": "", "members": []}, 400), ({"name": "x" * 101}, 400),
                         ({"name": "ok", "members": "bob"}, 400), ({"name": "ok", "members": ["abc"]}, 400),
                         ({"name": "ok", "members": ["999999999"]}, 404), ({"name": "a\x00b"}, 400)]:
        r = api(owner)("POST", "/api/groups", json=body)
        assert r.status_code == status and r.json()["error"] and r.json()["message"], (body, r.text)
    assert api(owner)("POST", "/api/groups", data="not json").status_code == 400


def test_roles_who_may_add_remove_promote_and_leave(cluster, make_user, api):
    owner, admin, member, newcomer, other = (make_user() for _ in range(5))
    gid = make_group(api, owner, [admin, member])["group_id"]
    members = f"/api/groups/{gid}/members"
    assert api(member)("POST", members, json={"user_ids": [newcomer.user_id]}).status_code == 403
    assert api(owner)("PATCH", f"{members}/{admin.user_id}", json={"role": "admin"}).status_code == 204
    assert api(owner)("PATCH", f"{members}/{admin.user_id}", json={"role": "king"}).status_code == 400
    r = api(admin)("POST", members, json={"user_ids": [newcomer.user_id, member.user_id]})
    assert r.status_code == 200 and r.json()["added"] == [newcomer.user_id]  # a member already in is no change
    assert api(admin)("POST", members, json={"user_ids": []}).status_code == 400
    assert api(member)("DELETE", f"{members}/{newcomer.user_id}").status_code == 403  # plain members may not
    assert api(admin)("DELETE", f"{members}/{owner.user_id}").status_code == 403  # nor admins, the owner
    assert api(admin)("DELETE", f"{members}/{other.user_id}").status_code == 404  # not a member
    assert api(admin)("DELETE", f"{members}/{newcomer.user_id}").status_code == 204
    r = api(owner)("DELETE", f"{members}/{owner.user_id}")
    assert r.status_code == 409 and "owner" in r.json()["message"]
    assert api(owner)("PATCH", f"{members}/{admin.user_id}", json={"role": "owner"}).status_code == 204
    roles = {m["user_id"]: m["role"] for m in api(member)("GET", members).json()["members"]}
    assert roles == {owner.user_id: "admin", admin.user_id: "owner", member.user_id: "member"}
    assert api(member)("DELETE", f"{members}/{member.user_id}").status_code == 204  # leaving
    assert api(member)("GET", members).status_code == 403


def test_fan_out_live_across_gateways_and_offline_members_get_unread_index_and_a_group_push(
        cluster, make_user, connect, storage, api):
    alice, bob, carol, dave = (make_user() for _ in range(4))
    token = add_ios_device(storage, dave)
    created = make_group(api, alice, [bob, carol, dave], name="Ops")
    gid, cid = created["group_id"], created["conversation_id"]
    a, a_tablet = connect(alice, cluster.gw1), connect(alice, cluster.gw2)
    b, c = connect(bob, cluster.gw2), connect(carol, cluster.gw1)
    ack = group_send(a, gid, "deploy at 5 ✅")
    assert ack["type"] == "ack" and ack["conversation_id"] == cid
    for client in (b, c, a_tablet):  # the sender's other device too
        live = client.wait_message(ack["msg_id"])
        assert (live["group_id"], live["to"], live["from"], live["content"]) == (gid, None, alice.user_id,
                                                                                "deploy at 5 ✅")
    # Dave is offline: index row, unread, and one push at group priority titled with the group.
    wait_until(lambda: unread_counts(storage, int(dave.user_id)) == {cid: 1}, what="dave's unread")
    with storage.sessions() as session:
        assert session.scalars(select(OfflineMessageIndex.message_id).where(
            OfflineMessageIndex.user_id == int(dave.user_id))).all() == [int(ack["msg_id"])]
    wait_until(lambda: [n for n in cluster.fakes.apns.notifications if n.token == token], timeout=15,
               what="dave's push")
    [note] = [n for n in cluster.fakes.apns.notifications if n.token == token]
    assert note.payload["aps"]["alert"] == {"title": "Ops", "body": f"{alice.username}: deploy at 5 ✅"}
    with storage.sessions() as session:
        [push] = session.scalars(select(PushLog).where(PushLog.user_id == int(dave.user_id))).all()
    assert push.priority == PRIORITY_GROUP
    assert unread_counts(storage, int(bob.user_id)) == {cid: 1}
    assert unread_counts(storage, int(alice.user_id)) == {}  # one's own message is never unread
    a.drain(quiet=0.3)
    assert not [m for m in a.messages() if m["msg_id"] == ack["msg_id"]]  # not echoed to the sending socket

    # Dave comes back: the message is in his stream once; the list shows who wrote it.
    d = connect(dave, cluster.gw2)
    entries, _, _ = sync_all(d)
    assert [e["msg_id"] for e in entries if e["type"] == "message"] == [ack["msg_id"]]
    [item] = [x for x in api(dave)("GET", "/api/conversations").json()["conversations"] if x["conversation_id"] == cid]
    assert item["last_message"] == f"{alice.username}: deploy at 5 ✅" and item["unread"] == 1
    for member in (alice, bob, carol, dave):
        assert stream_entries(storage, member, ack["msg_id"]) == [0]


def test_read_in_a_group_clears_unread_on_every_device_and_tells_the_author(
        cluster, make_user, connect, storage, api):
    alice, bob, carol = make_user(), make_user(), make_user()
    cid = make_group(api, alice, [bob, carol])["conversation_id"]
    gid = cid[2:]
    a, b1, b2 = connect(alice), connect(bob, cluster.gw1), connect(bob, cluster.gw2)
    acks = [group_send(a, gid, f"note {i}") for i in range(3)]
    b1.wait_message(acks[-1]["msg_id"])
    wait_until(lambda: unread_counts(storage, int(bob.user_id)) == {cid: 3}, what="three unread")
    b1.send_json({"type": "read", "conversation_id": cid, "msg_id": acks[1]["msg_id"]})
    b1.next_frame(lambda f: f["type"] == "read_ok")
    b2.next_frame(lambda f: f["type"] == "read_ok" and f["msg_id"] == acks[1]["msg_id"])
    receipt = a.next_frame(lambda f: f["type"] == "receipt")
    assert (receipt["reader"], receipt["msg_id"], receipt["conversation_id"]) == (bob.user_id, acks[1]["msg_id"], cid)
    assert unread_counts(storage, int(bob.user_id)) == {cid: 1}
    # Rebuilt from MySQL alone, the counts are the same for every member.
    for member, expected in ((bob, {cid: 1}), (carol, {cid: 3}), (alice, {})):
        storage.redis.delete(UNREAD_KEY.format(member.user_id))
        assert unread_counts(storage, int(member.user_id)) == expected


def test_a_non_member_cannot_send_and_an_unknown_group_is_not_found(cluster, make_user, connect, api):
    alice, bob, outsider = make_user(), make_user(), make_user()
    gid = make_group(api, alice, [bob])["group_id"]
    o = connect(outsider)
    err = group_send(o, gid, "let me in")
    assert (err["type"], err["code"]) == ("error", "forbidden")
    err = group_send(o, "987654321987", "anyone?")
    assert (err["type"], err["code"]) == ("error", "not_found")
    o.send_json({"type": "send", "client_msg_id": "both", "group_id": gid, "to": bob.user_id, "content": "x"})
    assert o.next_frame(lambda f: f["type"] == "error")["code"] == "invalid_frame"


def test_a_muted_group_gets_no_push_but_still_counts_unread(cluster, make_user, connect, storage, api):
    alice, bob = make_user(), make_user()
    token = add_ios_device(storage, bob)
    cid = make_group(api, alice, [bob])["conversation_id"]
    api(bob)("PUT", "/api/push-settings", json={"muted_conversations": [cid]}).raise_for_status()
    a = connect(alice)
    ack = group_send(a, cid[2:], "muted news")
    wait_until(lambda: unread_counts(storage, int(bob.user_id)) == {cid: 1}, what="bob's unread")
    wait_until(lambda: not storage.redis.exists(f"push:coalesce:{bob.user_id}"), timeout=15,
               what="the push planner to run")
    assert [n for n in cluster.fakes.apns.notifications if n.token == token] == []
    with storage.sessions() as session:
        assert session.scalars(select(PushLog).where(PushLog.message_id == int(ack["msg_id"]))).all() == []


def test_removal_stops_delivery_sending_and_later_history_and_newcomers_see_from_their_join(
        cluster, make_user, connect, storage, api):
    owner, bob, carol, frank = (make_user() for _ in range(4))
    created = make_group(api, owner, [bob, carol])
    gid, cid = created["group_id"], created["conversation_id"]
    o, c = connect(owner, cluster.gw1), connect(carol, cluster.gw2)
    before = group_send(o, gid, "before removal")
    c.wait_message(before["msg_id"])
    assert api(owner)("DELETE", f"/api/groups/{gid}/members/{carol.user_id}").status_code == 204
    assert group_send(c, gid, "can I still talk?")["code"] == "forbidden"
    assert api(owner)("POST", f"/api/groups/{gid}/members", json={"user_ids": [frank.user_id]}).status_code == 200
    after = group_send(o, gid, "after removal")
    # Frank joined between the two: he sees only the later one, in his stream and in history.
    wait_until(lambda: stream_entries(storage, frank, after["msg_id"]) == [0], what="frank's stream entry")
    entries, _, _ = sync_all(connect(frank, cluster.gw1))
    assert [e["msg_id"] for e in entries if e["type"] == "message" and e["conversation_id"] == cid] == [after["msg_id"]]
    history = api(frank)("GET", f"/api/conversations/{cid}/messages").json()["messages"]
    assert [m["msg_id"] for m in history] == [after["msg_id"]]
    assert stream_entries(storage, frank, before["msg_id"]) == []
    # Carol: nothing after her removal, live, in her stream or in history; what she saw stays hers.
    bob_client = connect(bob)
    third = group_send(o, gid, "still without carol")
    bob_client.wait_message(third["msg_id"])
    c.drain(quiet=0.5)
    assert [m["msg_id"] for m in c.messages()] == [before["msg_id"]]
    for later in (after, third):
        assert stream_entries(storage, carol, later["msg_id"]) == []
    history = api(carol)("GET", f"/api/conversations/{cid}/messages").json()["messages"]
    assert [m["msg_id"] for m in history] == [before["msg_id"]]
    [item] = [x for x in api(carol)("GET", "/api/conversations").json()["conversations"] if x["conversation_id"] == cid]
    assert item["group"]["member"] is False


def test_recall_rules_in_a_group(cluster, make_user, connect, storage, api):
    owner, bob, carol = make_user(), make_user(), make_user()
    cid = make_group(api, owner, [bob, carol])["conversation_id"]
    gid = cid[2:]
    o, b, c = connect(owner, cluster.gw1), connect(bob, cluster.gw2), connect(carol, cluster.gw1)
    mine = group_send(b, gid, "oops, wrong group")
    c.wait_message(mine["msg_id"])
    c.send_json({"type": "recall", "msg_id": mine["msg_id"]})
    assert c.next_frame(lambda f: f["type"] == "error")["code"] == "forbidden"  # not hers
    b.send_json({"type": "recall", "msg_id": mine["msg_id"]})
    for client in (o, b, c):
        client.next_frame(lambda f: f["type"] == "recalled" and f["msg_id"] == mine["msg_id"])
    for member in (owner, bob, carol):
        assert sorted(stream_entries(storage, member, mine["msg_id"])) == [0, 1]
    with storage.sessions() as session:
        assert session.get(Message, int(mine["msg_id"])).content == ""
    assert unread_counts(storage, int(carol.user_id)) == {}

    old = group_send(b, gid, "an old message")
    c.wait_message(old["msg_id"])
    later = int(time.time() * 1000) + 10 * 60 * 1000  # ten minutes on
    with pytest.raises(RecallExpired):
        recall_message(storage, int(bob.user_id), int(old["msg_id"]), now_ms=later)
    with pytest.raises(Forbidden):
        recall_message(storage, int(carol.user_id), int(old["msg_id"]), now_ms=later)
    outcome = recall_message(storage, int(owner.user_id), int(old["msg_id"]), now_ms=later)  # the owner, any time
    assert sorted(outcome.parties) == sorted(int(u.user_id) for u in (owner, bob, carol))
    c.send_json({"type": "sync", "cursor": None, "limit": 500})
    batch = c.next_frame(lambda f: f["type"] == "sync_batch")
    assert [e["type"] for e in batch["messages"] if e.get("msg_id") == old["msg_id"]] == ["message", "recalled"]


def test_a_redelivered_chunk_writes_nothing_twice(cluster, make_user, connect, storage, api):
    alice, bob, carol = make_user(), make_user(), make_user()
    cid = make_group(api, alice, [bob, carol])["conversation_id"]
    unread_counts(storage, int(carol.user_id))  # counters built: dispatch counts in Redis
    ack = group_send(connect(alice), cid[2:], "once per member")
    wait_until(lambda: unread_counts(storage, int(carol.user_id)) == {cid: 1}, what="carol's unread")
    members = [int(u.user_id) for u in (alice, bob, carol)]
    again = fan_out_group_message(storage, int(ack["msg_id"]), members, None)  # what a redelivery does
    assert sorted(again.offline_users) == sorted([int(bob.user_id), int(carol.user_id)])
    for member in (alice, bob, carol):
        assert stream_entries(storage, member, ack["msg_id"]) == [0]
    assert unread_counts(storage, int(carol.user_id)) == {cid: 1}
    with storage.sessions() as session:
        assert session.query(OfflineMessageIndex).filter(
            OfflineMessageIndex.message_id == int(ack["msg_id"])).count() == 2


def test_a_dispatch_worker_killed_mid_fan_out_loses_and_duplicates_nothing(
        real_services, cluster, make_user, connect, storage, api):
    alice, *others = (make_user() for _ in range(7))
    cid = make_group(api, alice, others)["conversation_id"]
    for user in others:
        unread_counts(storage, int(user.user_id))
    a = connect(alice)
    cluster.dispatch.signal(signal.SIGSTOP)  # its prefetched chunks die with it
    try:
        acks = [group_send(a, cid[2:], f"through a crash {i}") for i in range(4)]
        assert all(x["type"] == "ack" for x in acks)
        wait_until(lambda: _stored_in(storage, cid) == 4, what="the messages stored")
    finally:
        cluster.dispatch.kill()
    cluster.ensure_dispatch_worker()
    for user in others:
        wait_until(lambda: unread_counts(storage, int(user.user_id)) == {cid: 4}, timeout=30,
                   what=f"user {user.user_id} counting all four")
    for user in [alice, *others]:
        with storage.sessions() as session:
            got = session.scalars(select(SyncEntry.message_id).where(
                SyncEntry.user_id == int(user.user_id), SyncEntry.conversation_id == cid,
                SyncEntry.kind == ENTRY_MESSAGE)).all()
        assert sorted(got) == sorted(int(x["msg_id"]) for x in acks)
        storage.redis.delete(UNREAD_KEY.format(user.user_id))  # and MySQL agrees
        assert unread_counts(storage, int(user.user_id)) == ({} if user is alice else {cid: 4})


def _stored_in(storage, cid):
    with storage.sessions() as session:
        return session.query(Message).filter(Message.conversation_id == cid).count()


def test_a_persist_worker_killed_mid_transaction_loses_no_group_message(
        real_services, out_of_risk_window, cluster, make_user, connect, storage, api):
    from tests.test_crash_recovery import _admin_connection

    alice, bob, carol = make_user(), make_user(), make_user()
    cid = make_group(api, alice, [bob, carol])["conversation_id"]
    a, b, c = connect(alice, cluster.gw1), connect(bob, cluster.gw2), connect(carol, cluster.gw1)
    locker = _admin_connection(real_services.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLES chat_group WRITE")  # persist waits on the group's sequence number
        ack = group_send(a, cid[2:], "survives a crash")
        assert ack["type"] == "ack"

        def persist_blocked():
            with locker.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                            "AND INFO LIKE 'UPDATE chat_group%%' AND ID <> CONNECTION_ID()")
                return cur.fetchone()[0]

        wait_until(persist_blocked, timeout=15, what="persist to block on the group row")
        cluster.persist.kill()
    finally:
        with locker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        locker.close()
    cluster.ensure_persist_worker()  # the unacknowledged task is redelivered
    for client in (b, c):
        assert client.wait_message(ack["msg_id"], timeout=30)["content"] == "survives a crash"
    assert _stored_in(storage, cid) == 1
    for member in (alice, bob, carol):
        assert stream_entries(storage, member, ack["msg_id"]) == [0]


def test_a_retry_of_an_acked_send_gets_its_ack_even_after_the_sender_was_removed(cluster, make_user, connect, api):
    owner, bob = make_user(), make_user()
    gid = make_group(api, owner, [bob])["group_id"]
    b = connect(bob)
    first = group_send(b, gid, "sent just in time", client_msg_id="late-1")
    assert first["type"] == "ack"
    assert api(owner)("DELETE", f"/api/groups/{gid}/members/{bob.user_id}").status_code == 204
    again = group_send(b, gid, "sent just in time", client_msg_id="late-1")  # the ack was lost: a retry
    assert (again["type"], again["msg_id"]) == ("ack", first["msg_id"])
    assert group_send(b, gid, "a new one", client_msg_id="late-2")["code"] == "forbidden"


def test_a_message_recalled_before_its_fan_out_reaches_members_as_recalled(cluster, make_user, connect, storage, api):
    owner, bob, carol = make_user(), make_user(), make_user()
    cid = make_group(api, owner, [bob, carol])["conversation_id"]
    unread_counts(storage, int(carol.user_id))
    o = connect(owner)
    cluster.dispatch.signal(signal.SIGSTOP)  # the message is stored; its fan-out waits
    try:
        ack = group_send(o, cid[2:], "take this back")
        wait_until(lambda: _stored_in(storage, cid) == 1, what="the message stored")
        o.send_json({"type": "recall", "msg_id": ack["msg_id"]})
        assert o.next_frame(lambda f: f["type"] in ("recalled", "error"))["type"] == "recalled"
    finally:
        cluster.dispatch.signal(signal.SIGCONT)
    wait_until(lambda: sorted(stream_entries(storage, carol, ack["msg_id"])) == [0, 1], what="carol's entries")
    c = connect(carol)
    entries, _, _ = sync_all(c)
    mine = [(e["type"], e.get("content")) for e in entries if e.get("msg_id") == ack["msg_id"]]
    assert mine == [("message", ""), ("recalled", None)]
    assert unread_counts(storage, int(carol.user_id)) == {}
    [item] = [x for x in api(carol)("GET", "/api/conversations").json()["conversations"] if x["conversation_id"] == cid]
    assert item["last_message"] == "[message recalled]"


def test_the_owner_recalls_their_own_old_message_too(cluster, make_user, connect, storage, api):
    owner, bob = make_user(), make_user()
    cid = make_group(api, owner, [bob])["conversation_id"]
    ack = group_send(connect(owner), cid[2:], "an old announcement")
    wait_until(lambda: stream_entries(storage, owner, ack["msg_id"]) == [0], what="the owner's entry")
    later = int(time.time() * 1000) + 60 * 60 * 1000
    assert recall_message(storage, int(owner.user_id), int(ack["msg_id"]), now_ms=later).recalled_at == later


def test_the_owner_or_an_admin_renames_a_group_and_every_list_shows_it(cluster, make_user, api):
    owner, admin, member = make_user(), make_user(), make_user()
    created = make_group(api, owner, [admin, member], name="Old name")
    gid, cid = created["group_id"], created["conversation_id"]
    api(owner)("PATCH", f"/api/groups/{gid}/members/{admin.user_id}", json={"role": "admin"}).raise_for_status()
    assert api(member)("PATCH", f"/api/groups/{gid}", json={"name": "Mine now"}).status_code == 403
    assert api(admin)("PATCH", f"/api/groups/{gid}", json={"name": " "}).status_code == 400
    assert api(admin)("PATCH", f"/api/groups/{gid}", json={"name": "  New name ✨ "}).status_code == 204
    for user in (owner, admin, member):
        [item] = [c for c in api(user)("GET", "/api/conversations").json()["conversations"]
                  if c["conversation_id"] == cid]
        assert item["group"]["name"] == "New name ✨"
    assert [g["name"] for g in api(member)("GET", "/api/groups").json()["groups"] if g["group_id"] == gid] == \
        ["New name ✨"]
