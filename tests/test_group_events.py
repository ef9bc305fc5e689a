"""Group events end to end: every membership change reaches the affected users' connections live
(on any gateway) and their sync streams; a removed member learns at once and gets nothing more;
a deleted group leaves every list; `sync` from "latest"; concurrent changes keep streams gap-free."""
import threading

import requests
from sqlalchemy import select

from models import ENTRY_GROUP_EVENT, SyncEntry
from tests.harness import wait_until
from tests.test_groups import Api, group_send, make_group
from tests.test_sync import sync_all


def api_of(cluster, user, gateway=None):
    return Api((gateway or cluster.gw1).http, user)


def next_event(client, event, group_id, timeout=10.0):
    return client.next_frame(lambda f: f["type"] == "group_event" and f["event"] == event
                             and f["group_id"] == group_id, timeout)


def events_in(entries, group_id):
    return [e for e in entries if e["type"] == "group_event" and e["group_id"] == group_id]


def without_type(frame):
    return {k: v for k, v in frame.items() if k != "_taken"}


def test_each_event_kind_reaches_other_gateways_live_and_an_offline_members_stream(cluster, make_user, connect):
    owner, bob, carol, dave = (make_user() for _ in range(4))
    b1, b2 = connect(bob, cluster.gw1), connect(bob, cluster.gw2)  # two devices, two gateways
    d = connect(dave, cluster.gw2)
    created = make_group(lambda u: api_of(cluster, u), owner, [bob, carol], name="Crew")
    gid = created["group_id"]
    owner_api = api_of(cluster, owner, cluster.gw2)

    def on_both(event):  # bob's two devices get the same frame
        frame = next_event(b2, event, gid)
        assert without_type(next_event(b1, event, gid)) == without_type(frame)
        return frame

    first = on_both("created")
    assert (first["actor_id"], sorted(first["user_ids"]), first["name"], first["conversation_id"]) == (
        owner.user_id, sorted([owner.user_id, bob.user_id, carol.user_id]), "Crew", f"g_{gid}")
    assert isinstance(first["event_id"], str) and isinstance(first["timestamp"], int) and first["role"] is None

    assert owner_api("POST", f"/api/groups/{gid}/members", json={"user_ids": [dave.user_id]}).status_code == 200
    added = on_both("member_added")
    assert added["user_ids"] == [dave.user_id] and added["actor_id"] == owner.user_id
    assert next_event(d, "member_added", gid)["event_id"] == added["event_id"]  # the newcomer learns it too

    assert owner_api("PATCH", f"/api/groups/{gid}", json={"name": "Crew 2"}).status_code == 204
    assert on_both("renamed")["name"] == "Crew 2"
    assert next_event(d, "renamed", gid)["name"] == "Crew 2"
    assert owner_api("PATCH", f"/api/groups/{gid}/members/{bob.user_id}", json={"role": "admin"}).status_code == 204
    promoted = on_both("role_changed")
    assert (promoted["user_ids"], promoted["role"]) == ([bob.user_id], "admin")

    assert owner_api("DELETE", f"/api/groups/{gid}/members/{dave.user_id}").status_code == 204
    removed = next_event(d, "member_removed", gid)  # the removed member's connection learns it at once
    assert (removed["user_ids"], removed["actor_id"]) == ([dave.user_id], owner.user_id)
    assert on_both("member_removed")["event_id"] == removed["event_id"]

    # Ownership handed over: two role changes, the new owner's and the former owner's.
    assert owner_api("PATCH", f"/api/groups/{gid}/members/{bob.user_id}", json={"role": "owner"}).status_code == 204
    handover = [on_both("role_changed"), on_both("role_changed")]
    assert [(e["user_ids"], e["role"]) for e in handover] == [([bob.user_id], "owner"), ([owner.user_id], "admin")]
    assert api_of(cluster, owner)("DELETE", f"/api/groups/{gid}/members/{owner.user_id}").status_code == 204  # leaving
    left = on_both("member_removed")
    assert left["user_ids"] == [owner.user_id] and left["actor_id"] == owner.user_id

    assert api_of(cluster, bob)("DELETE", f"/api/groups/{gid}").status_code == 204
    assert on_both("deleted")["actor_id"] == bob.user_id
    d.drain()
    assert not [f for f in d.frames if f["type"] == "group_event" and f["group_id"] == gid
                and int(f["event_id"]) > int(removed["event_id"])]  # nothing live after his removal

    # Carol was offline throughout: her stream holds every event she was affected by, in order, once.
    c = connect(carol, cluster.gw1)
    entries, _, _ = sync_all(c)
    kinds = [e["event"] for e in events_in(entries, gid)]
    assert kinds == ["created", "member_added", "renamed", "role_changed", "member_removed",
                     "role_changed", "role_changed", "member_removed", "deleted"]
    assert [e["event_id"] for e in events_in(entries, gid)] == sorted(
        {e["event_id"] for e in events_in(entries, gid)}, key=int)
    assert without_type(events_in(entries, gid)[0]) == without_type(first)  # the same fields as live
    # Dave's stream: from his join up to his removal, nothing after.
    dave_entries, _, _ = sync_all(d)
    assert [e["event"] for e in events_in(dave_entries, gid)] == ["member_added", "renamed", "role_changed",
                                                                 "member_removed"]


def test_a_removed_member_learns_at_once_and_stops_getting_the_groups_messages(cluster, make_user, connect):
    owner, bob, carol = (make_user() for _ in range(3))
    gid = make_group(lambda u: api_of(cluster, u), owner, [bob, carol])["group_id"]
    o, b, c = connect(owner, cluster.gw1), connect(bob, cluster.gw1), connect(carol, cluster.gw2)
    before = group_send(o, gid, "before")
    c.wait_message(before["msg_id"])

    assert api_of(cluster, owner)("DELETE", f"/api/groups/{gid}/members/{carol.user_id}").status_code == 204
    assert next_event(c, "member_removed", gid)["user_ids"] == [carol.user_id]
    after = group_send(o, gid, "after")
    assert after["type"] == "ack"
    b.wait_message(after["msg_id"])  # the fan-out ran...
    c.drain()
    assert after["msg_id"] not in {m["msg_id"] for m in c.messages()}  # ...and not to her
    entries, _, _ = sync_all(c)
    assert [e["msg_id"] for e in entries if e["type"] == "message"] == [before["msg_id"]]
    assert group_send(c, gid, "still here?")["code"] == "forbidden"


def test_a_deleted_group_leaves_every_list_refuses_sends_and_keeps_history(cluster, make_user, connect):
    owner, bob, outsider = (make_user() for _ in range(3))
    created = make_group(lambda u: api_of(cluster, u), owner, [bob], name="Gone soon")
    gid, cid = created["group_id"], created["conversation_id"]
    o, b = connect(owner, cluster.gw1), connect(bob, cluster.gw2)
    sent = group_send(o, gid, "kept")
    b.wait_message(sent["msg_id"])

    assert api_of(cluster, bob)("DELETE", f"/api/groups/{gid}").status_code == 403  # a member, not the owner
    assert api_of(cluster, outsider)("DELETE", f"/api/groups/{gid}").status_code == 403
    assert api_of(cluster, owner)("DELETE", "/api/groups/999999999").status_code == 404
    assert api_of(cluster, owner)("DELETE", f"/api/groups/{gid}").status_code == 204
    assert next_event(b, "deleted", gid)["actor_id"] == owner.user_id
    assert next_event(o, "deleted", gid)["name"] == "Gone soon"

    for user in (owner, bob):
        user_api = api_of(cluster, user, cluster.gw2)
        assert gid not in {g["group_id"] for g in user_api("GET", "/api/groups").json()["groups"]}
        assert cid not in {c["conversation_id"] for c in user_api("GET", "/api/conversations").json()["conversations"]}
        assert user_api("GET", f"/api/groups/{gid}/members").status_code == 404
        # What they received stays theirs: in history and in the stream.
        history = user_api("GET", f"/api/conversations/{cid}/messages").json()["messages"]
        assert [m["msg_id"] for m in history] == [sent["msg_id"]]
    entries, _, _ = sync_all(b)
    assert [e["msg_id"] for e in entries if e["type"] == "message"] == [sent["msg_id"]]
    assert [e["event"] for e in events_in(entries, gid)] == ["created", "deleted"]

    assert group_send(o, gid, "anyone?")["code"] == "not_found"
    assert group_send(b, gid, "anyone?")["code"] == "not_found"
    assert api_of(cluster, owner)("DELETE", f"/api/groups/{gid}").status_code == 404  # gone already
    assert api_of(cluster, owner)("PATCH", f"/api/groups/{gid}", json={"name": "back"}).status_code == 404
    r = api_of(cluster, owner)("POST", f"/api/groups/{gid}/members", json={"user_ids": [outsider.user_id]})
    assert r.status_code == 404


def test_the_owner_cannot_leave_others_behind_and_leaving_alone_deletes_the_group(cluster, make_user, connect):
    owner, bob = make_user(), make_user()
    owner_api = api_of(cluster, owner)
    gid = make_group(lambda u: api_of(cluster, u), owner, [bob])["group_id"]
    r = owner_api("DELETE", f"/api/groups/{gid}/members/{owner.user_id}")
    assert r.status_code == 409 and "DELETE /api/groups/" in r.json()["message"]
    assert owner_api("DELETE", f"/api/groups/{gid}/members/{bob.user_id}").status_code == 204

    o = connect(owner, cluster.gw2)
    assert owner_api("DELETE", f"/api/groups/{gid}/members/{owner.user_id}").status_code == 204  # the last one
    assert next_event(o, "deleted", gid)["actor_id"] == owner.user_id
    assert gid not in {g["group_id"] for g in owner_api("GET", "/api/groups").json()["groups"]}
    assert f"g_{gid}" not in {c["conversation_id"] for c in owner_api("GET", "/api/conversations").json()["conversations"]}


def test_sync_from_latest_starts_a_new_device_at_the_end_of_the_stream(cluster, make_user, connect, storage):
    alice, bob = make_user(), make_user()
    a, b_phone = connect(alice, cluster.gw1), connect(bob, cluster.gw1)
    old = [a.send_message(bob.user_id, f"old {i}")["msg_id"] for i in range(3)]
    for msg_id in old:
        b_phone.wait_message(msg_id)
    wait_until(lambda: len(_stream_seqs(storage, bob)) == 3, what="bob's three entries")

    tablet = connect(bob, cluster.gw2)
    tablet.send_json({"type": "sync", "cursor": "latest"})
    batch = tablet.next_frame(lambda f: f["type"] == "sync_batch")
    assert (batch["messages"], batch["has_more"]) == ([], False)
    _, phone_cursor, _ = sync_all(b_phone)
    assert batch["cursor"] == phone_cursor  # the end every device reaches by paging

    new = a.send_message(bob.user_id, "new")["msg_id"]
    tablet.wait_message(new)
    wait_until(lambda: len(_stream_seqs(storage, bob)) == 4, what="bob's fourth entry")
    entries, _, _ = sync_all(tablet, batch["cursor"])
    assert [e["msg_id"] for e in entries] == [new]

    tablet.send_json({"type": "sync", "cursor": "latest", "limit": 0})  # the limit is still checked
    assert tablet.next_frame(lambda f: f["type"] == "error")["code"] == "invalid_frame"
    tablet.send_json({"type": "sync", "cursor": "LATEST"})
    assert tablet.next_frame(lambda f: f["type"] == "error")["code"] == "invalid_frame"
    fresh = connect(make_user(), cluster.gw1)
    fresh.send_json({"type": "sync", "cursor": "latest"})
    assert fresh.next_frame(lambda f: f["type"] == "sync_batch")["cursor"] == "0"  # nothing yet


def _stream_seqs(storage, user, kind=None):
    with storage.sessions() as session:
        query = select(SyncEntry.seq).where(SyncEntry.user_id == int(user.user_id))
        if kind is not None:
            query = query.where(SyncEntry.kind == kind)
        return list(session.scalars(query.order_by(SyncEntry.seq)).all())


def test_concurrent_additions_keep_every_stream_gap_free_with_each_event_once(cluster, make_user, connect, storage):
    owner = make_user()
    joiners = [[make_user(), make_user()] for _ in range(6)]
    gid = make_group(lambda u: api_of(cluster, u), owner, [])["group_id"]
    watcher = connect(owner, cluster.gw2)
    answers = []

    def add(pair, gateway):
        r = requests.post(f"{gateway.http}/api/groups/{gid}/members", json={"user_ids": [u.user_id for u in pair]},
                          headers={"Authorization": f"Bearer {owner.token}"}, timeout=30)
        answers.append(r.status_code)

    threads = [threading.Thread(target=add, args=(pair, cluster.gw1 if i % 2 else cluster.gw2))
               for i, pair in enumerate(joiners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [200] * len(joiners)

    live = [next_event(watcher, "member_added", gid) for _ in joiners]
    assert len({e["event_id"] for e in live}) == len(joiners)
    owner_events = [e["event_id"] for e in events_in(sync_all(watcher)[0], gid)]
    assert len(owner_events) == len(set(owner_events)) == 1 + len(joiners)  # created + each addition, once
    assert owner_events == sorted(owner_events, key=int)  # the stream holds them in commit order
    assert {e["event_id"] for e in live} == set(owner_events[1:])  # each addition live too
    for pair in joiners:
        for user in pair:
            seqs = _stream_seqs(storage, user)
            assert seqs == list(range(1, len(seqs) + 1))  # consecutive, from 1
            entries, _, _ = sync_all(connect(user, cluster.gw1))
            mine = [e["event_id"] for e in events_in(entries, gid)]
            # Exactly the events from the one that added them onward, once each.
            joined = next(e["event_id"] for e in live if user.user_id in e["user_ids"])
            assert mine == owner_events[owner_events.index(joined):]
    assert _stream_seqs(storage, owner) == list(range(1, len(_stream_seqs(storage, owner)) + 1))
    assert len(_stream_seqs(storage, owner, ENTRY_GROUP_EVENT)) == 1 + len(joiners)


def test_a_deleted_account_leaves_its_groups_with_events_and_its_solo_group_is_deleted(cluster, make_user, connect):
    alice, bob, carol = (make_user() for _ in range(3))
    shared = make_group(lambda u: api_of(cluster, u), alice, [bob, carol], name="Alice's")["group_id"]
    solo = make_group(lambda u: api_of(cluster, u), alice, [carol], name="Soon alone")["group_id"]
    carol_api = api_of(cluster, carol)
    assert carol_api("DELETE", f"/api/groups/{solo}/members/{carol.user_id}").status_code == 204
    b = connect(bob, cluster.gw2)

    r = api_of(cluster, alice)("DELETE", "/api/account", json={"password": "correct-horse"})
    assert r.status_code == 204
    handover = next_event(b, "role_changed", shared)  # the group passes on first (the earliest member)
    assert (handover["role"], handover["actor_id"]) == ("owner", alice.user_id)
    heir = handover["user_ids"][0]
    assert heir in (bob.user_id, carol.user_id)
    left = next_event(b, "member_removed", shared)
    assert left["user_ids"] == [alice.user_id] == [left["actor_id"]]
    entries, _, _ = sync_all(connect(carol, cluster.gw1))
    assert [e["event"] for e in events_in(entries, shared)] == ["created", "role_changed", "member_removed"]
    # Alice was alone in her other group: it is deleted, and leaves Carol's list too (she had left it).
    assert f"g_{solo}" not in {c["conversation_id"] for c in carol_api("GET", "/api/conversations").json()["conversations"]}
    assert carol_api("GET", f"/api/groups/{solo}/members").status_code == 404
