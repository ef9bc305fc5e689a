"""Message search (GET /api/search/messages) and the username prefix lookup (GET /api/users?prefix=),
end to end: messages sent over the WebSocket, stored by the persist worker, found over REST."""
import os
import subprocess
import sys
import time
import uuid

import requests
from sqlalchemy import insert

from app.chat.conversations import private_conversation_id
from models import Message, MessageSearch
from tests.harness import ROOT, wait_until
from tests.test_groups import group_send, make_group


def _search(gateway, user, **params):
    headers = {"Authorization": f"Bearer {user.token}"} if user is not None else {}
    return requests.get(f"{gateway.http}/api/search/messages", headers=headers, params=params, timeout=10)


def _found(gateway, user, **params) -> list[str]:
    r = _search(gateway, user, **params)
    assert r.status_code == 200, r.text
    return [m["msg_id"] for m in r.json()["messages"]]


def _refused(response, status: int, code: str, says: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and says in body["message"], body


def _sent(client, to, content) -> str:
    ack = client.send_message(to, content)
    assert ack["type"] == "ack", ack
    return ack["msg_id"]


def _stored(gateway, user, conversation_id, msg_id) -> None:
    """Wait until persist stored the message (its history shows it): search reads the same rows."""
    def in_history():
        r = requests.get(f"{gateway.http}/api/conversations/{conversation_id}/messages",
                         headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
        return r.status_code == 200 and any(m["msg_id"] == msg_id for m in r.json()["messages"])
    wait_until(in_history, what=f"msg {msg_id} stored")


def _api(gateway, user):
    def call(method, path, **kwargs):
        return requests.request(method, f"{gateway.http}{path}", headers={"Authorization": f"Bearer {user.token}"},
                                timeout=10, **kwargs)
    return call


def test_chinese_and_japanese_words_are_found_in_unsegmented_text_and_only_by_the_parties(
        cluster, make_user, connect):
    alice, bob, carol = make_user(), make_user(), make_user()
    a = connect(alice)
    beijing = _sent(a, bob.user_id, "我们明天去北京开会")
    tokyo = _sent(a, bob.user_id, "来週は東京で会議があります")
    latin = _sent(a, bob.user_id, "Lunch at the Café? BEIJING duck!")
    conv = private_conversation_id(int(alice.user_id), int(bob.user_id))
    _stored(cluster.gw1, bob, conv, latin)

    assert _found(cluster.gw1, bob, q="北京") == [beijing]
    assert _found(cluster.gw2, alice, q="北京开会") == [beijing]  # the sender finds it too, on any gateway
    assert _found(cluster.gw1, bob, q="東京") == [tokyo]
    assert _found(cluster.gw1, bob, q="会議") == [tokyo]
    assert _found(cluster.gw1, bob, q="beijing") == [latin]  # case-insensitive words
    assert _found(cluster.gw1, bob, q="ＢＥＩＪＩＮＧ") == [latin]  # full-width letters too
    assert _found(cluster.gw1, bob, q="café lunch") == [latin]  # every word, any order
    assert _found(cluster.gw1, bob, q="duck soup") == []  # not every word
    # Bigrams that are all in the text but not next to each other are not a match.
    assert _found(cluster.gw1, bob, q="北京会") == []
    assert _found(cluster.gw1, bob, q="京都") == []
    # Carol is not a party: nothing of their chat, and no peeking by conversation id.
    assert _found(cluster.gw1, carol, q="北京") == []
    _refused(_search(cluster.gw1, carol, q="北京", conversation_id=conv), 403, "forbidden", "not a member")
    _refused(_search(cluster.gw1, carol, q="北京", conversation_id="p_1_999999999999"), 404, "not_found",
             "does not exist")
    item = _search(cluster.gw1, bob, q="北京", conversation_id=conv).json()["messages"][0]
    assert item["content"] == "我们明天去北京开会" and item["from"] == alice.user_id and item["type"] == "message"
    _refused(_search(cluster.gw1, None, q="北京"), 401, "unauthorized", "bearer")


def test_queries_too_short_too_long_or_with_operators_are_text_not_syntax(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    a = connect(alice)
    plain = _sent(a, bob.user_id, "release notes for version two")
    quoted = _sent(a, bob.user_id, "it's a \"quoted\" word; DROP TABLE message; -- done")
    _stored(cluster.gw1, bob, private_conversation_id(int(alice.user_id), int(bob.user_id)), quoted)

    _refused(_search(cluster.gw1, bob, q="北"), 400, "invalid_request", "at least 2 characters")
    _refused(_search(cluster.gw1, bob, q="x"), 400, "invalid_request", "at least 2 characters")
    _refused(_search(cluster.gw1, bob, q="y" * 201), 400, "invalid_request", "at most 200 characters")
    _refused(_search(cluster.gw1, bob), 400, "invalid_request", "'q' is required")
    assert _found(cluster.gw1, bob, q=" x") == []  # two characters; the word "x" is in no message
    assert _found(cluster.gw1, bob, q="*** ---") == []  # no word in it: nothing to find
    _refused(_search(cluster.gw1, bob, q="notes", limit="0"), 400, "invalid_request", "'limit'")
    _refused(_search(cluster.gw1, bob, q="notes", limit="101"), 400, "invalid_request", "'limit'")
    _refused(_search(cluster.gw1, bob, q="notes", before="abc"), 400, "invalid_request", "'before'")
    _refused(_search(cluster.gw1, bob, q="notes", conversation_id="../etc"), 400, "invalid_request",
             "'conversation_id'")
    assert len(_search(cluster.gw1, bob, q="z" * 200).json()["messages"]) == 0  # 200 is allowed

    # FTS5 and MySQL boolean-mode operators are plain text: the words around them must all be there.
    assert _found(cluster.gw1, bob, q="release -notes") == [plain]  # not "without notes"
    assert _found(cluster.gw1, bob, q="release OR zebra") == []  # OR is a word, not "either"
    assert _found(cluster.gw1, bob, q="rel*") == []  # no prefix wildcard
    assert _found(cluster.gw1, bob, q='"quoted" word') == [quoted]
    assert _found(cluster.gw1, bob, q="NEAR(release notes)") == []  # 'near' is just a word here
    assert _found(cluster.gw1, bob, q="' OR 1=1 --") == []
    assert _found(cluster.gw1, bob, q="drop table; --") == [quoted]
    assert _found(cluster.gw1, bob, q="message_search") == []  # table names are words like any other


def test_results_are_newest_first_paged_with_before_and_limited_to_one_conversation(cluster, make_user, connect):
    alice, bob, carol = make_user(), make_user(), make_user()
    a = connect(alice)
    to_bob = [_sent(a, bob.user_id, f"weekly 报告 number {i}") for i in range(5)]
    to_carol = _sent(a, carol.user_id, "weekly 报告 for carol")
    _stored(cluster.gw1, carol, private_conversation_id(int(alice.user_id), int(carol.user_id)), to_carol)
    _stored(cluster.gw1, bob, private_conversation_id(int(alice.user_id), int(bob.user_id)), to_bob[-1])

    assert _found(cluster.gw1, alice, q="报告") == [to_carol] + to_bob[::-1]
    pages, before = [], None
    while True:
        body = _search(cluster.gw1, alice, q="weekly 报告", limit=2, **({"before": before} if before else {})).json()
        pages.append([m["msg_id"] for m in body["messages"]])
        if not body["has_more"]:
            assert body["next_before"] is None
            break
        before = body["next_before"]
    assert pages == [[to_carol, to_bob[4]], [to_bob[3], to_bob[2]], [to_bob[1], to_bob[0]]]
    conv = private_conversation_id(int(alice.user_id), int(bob.user_id))
    assert _found(cluster.gw1, alice, q="报告", conversation_id=conv) == to_bob[::-1]
    assert _found(cluster.gw1, bob, q="报告") == to_bob[::-1]  # Bob sees his chat only


def test_a_group_member_finds_only_what_their_membership_shows(cluster, make_user, connect):
    owner, member, late = make_user(), make_user(), make_user()
    api = _api(cluster.gw1, owner)
    group = make_group(lambda user: _api(cluster.gw1, user), owner, [member])
    o = connect(owner)
    before_join = group_send(o, group["group_id"], "项目计划 before the join")
    assert before_join["type"] == "ack", before_join
    conv = before_join["conversation_id"]
    # Visibility follows commit order (an ack is not yet a commit): each membership change waits for the send.
    _stored(cluster.gw1, owner, conv, before_join["msg_id"])
    r = api("POST", f"/api/groups/{group['group_id']}/members", json={"user_ids": [late.user_id]})
    assert r.status_code in (200, 201), r.text
    after_join = group_send(o, group["group_id"], "项目计划 after the join")
    _stored(cluster.gw1, owner, conv, after_join["msg_id"])
    r = api("DELETE", f"/api/groups/{group['group_id']}/members/{member.user_id}")
    assert r.status_code == 204, r.text
    after_leave = group_send(o, group["group_id"], "项目计划 after member left")
    _stored(cluster.gw1, owner, conv, after_leave["msg_id"])

    assert _found(cluster.gw1, owner, q="项目计划") == [after_leave["msg_id"], after_join["msg_id"],
                                                    before_join["msg_id"]]
    assert _found(cluster.gw1, late, q="项目计划") == [after_leave["msg_id"], after_join["msg_id"]]
    assert _found(cluster.gw1, member, q="项目计划") == [after_join["msg_id"], before_join["msg_id"]]
    assert _found(cluster.gw1, member, q="项目计划", conversation_id=conv) == [after_join["msg_id"],
                                                                           before_join["msg_id"]]
    assert _found(cluster.gw1, make_user(), q="项目计划") == []


def test_a_recalled_message_is_never_found_again(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    a = connect(alice)
    kept = _sent(a, bob.user_id, "秘密 plan that stays")
    taken_back = _sent(a, bob.user_id, "秘密 password oops")
    _stored(cluster.gw1, bob, private_conversation_id(int(alice.user_id), int(bob.user_id)), taken_back)
    assert _found(cluster.gw1, bob, q="秘密") == [taken_back, kept]
    a.send_json({"type": "recall", "msg_id": taken_back})
    assert a.next_frame(lambda f: f["type"] in ("recalled", "error"))["type"] == "recalled"
    assert _found(cluster.gw1, bob, q="秘密") == [kept]
    assert _found(cluster.gw1, alice, q="password oops") == []


def _indexed(storage, msg_id) -> bool:
    with storage.sessions() as session:
        return session.get(MessageSearch, msg_id) is not None


def test_reindex_search_backfills_messages_stored_before_the_index(cluster, make_user, storage, services):
    alice, bob = make_user(), make_user()
    conv = private_conversation_id(int(alice.user_id), int(bob.user_id))
    # A message as a server before migration 0008 left it: a row with no index entry.
    old_id = (int(time.time() * 1000) << 22) + 1
    with storage.session() as session:
        session.execute(insert(Message), [{
            "id": old_id, "conversation_id": conv, "sender_id": int(alice.user_id), "receiver_id": int(bob.user_id),
            "client_msg_id": uuid.uuid4().hex, "message_type": "text", "content": "旧消息 from last year",
            "extra": None, "is_group": False, "timestamp": int(time.time() * 1000), "status": 0}])
    assert _indexed(storage, old_id) is False
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "reindex-search", "--after",
                           str(old_id - 1)], cwd=ROOT, env={**os.environ, **services.env()},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"up to msg id {old_id}" in done.stdout and "search index written for" in done.stdout, done.stdout
    assert _indexed(storage, old_id) is True
    assert _found(cluster.gw1, bob, q="旧消息") == [str(old_id)]
    again = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "reindex-search", "--after",
                            str(old_id - 1)], cwd=ROOT, env={**os.environ, **services.env()},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # running it twice is harmless
    assert _found(cluster.gw1, bob, q="旧消息") == [str(old_id)]


def test_usernames_by_prefix(cluster, make_user):
    stem = f"pf{uuid.uuid4().hex[:6]}"
    asker = make_user(f"{stem}_me")
    others = [make_user(f"{stem}_{i:02d}") for i in range(22)]
    unrelated = make_user(f"q{stem}_x")
    lookalike = make_user(f"{stem}x00")

    def lookup(**params):
        return requests.get(f"{cluster.gw1.http}/api/users", params=params,
                            headers={"Authorization": f"Bearer {asker.token}"}, timeout=10)

    r = lookup(prefix=stem)
    assert r.status_code == 200, r.text
    users = r.json()["users"]
    assert [u["username"] for u in users] == [o.username for o in others[:20]]  # at most 20, alphabetical
    assert users[0] == {"user_id": others[0].user_id, "username": others[0].username}
    assert asker.username not in {u["username"] for u in users} and unrelated.username not in str(users)
    assert [u["username"] for u in lookup(prefix=f"{stem}_2").json()["users"]] == [others[20].username,
                                                                                   others[21].username]
    # '_' is a LIKE wildcard in SQL: here it is only itself.
    assert lookalike.username not in str(lookup(prefix=f"{stem}_").json()["users"])
    assert [u["username"] for u in lookup(prefix=f"{stem}x").json()["users"]] == [lookalike.username]
    _refused(lookup(prefix="p"), 400, "invalid_request", "2-32 characters")
    _refused(lookup(prefix="a%"), 400, "invalid_request", "'prefix'")
    assert lookup(prefix=stem, username=others[1].username).json() == {  # with both, the exact lookup
        "user_id": others[1].user_id, "username": others[1].username}
    assert lookup(username=others[0].username).json()["user_id"] == others[0].user_id  # the exact lookup stays


def test_an_old_message_behind_a_full_page_of_newer_ones_is_found_through_the_index(make_user, cluster, storage):
    """More newer messages than search checks directly (SCAN_FIRST): the old one comes from the index."""
    from app.chat.persist import persist_private_messages
    from app.chat.search import SCAN_FIRST

    alice, bob = make_user(), make_user()
    conv = private_conversation_id(int(alice.user_id), int(bob.user_id))
    base, now = (int(time.time() * 1000) << 22) + 10, int(time.time() * 1000)

    def payload(i, content):
        return {"msg_id": str(base + i), "conversation_id": conv, "sender_id": int(alice.user_id),
                "to": int(bob.user_id), "client_msg_id": f"bulk-{i}", "message_type": "text", "content": content,
                "extra": {}, "timestamp": now}
    persist_private_messages(storage, [payload(0, "去年的年会在北京"), payload(1, "OR * 年会 NEAR")])
    persist_private_messages(storage, [payload(i, f"filler message number {i}") for i in range(2, SCAN_FIRST + 60)])

    assert _found(cluster.gw1, bob, q="年会") == [str(base + 1), str(base)]
    assert _found(cluster.gw1, bob, q="北京年会") == []  # both bigram sets are there, the words are not adjacent
    assert _found(cluster.gw1, bob, q="\"年会\" OR") == [str(base + 1)]
    assert _found(cluster.gw1, bob, q="年会", conversation_id=conv) == [str(base + 1), str(base)]
    assert _found(cluster.gw1, make_user(), q="年会") == []
    page = _search(cluster.gw1, bob, q="filler message", limit=100).json()
    assert len(page["messages"]) == 100 and page["has_more"] is True
    assert page["messages"][0]["msg_id"] == str(base + SCAN_FIRST + 59)


def test_an_old_group_message_is_found_through_the_index_by_members_only(make_user, cluster, storage):
    from app.chat.group_messages import persist_group_message
    from app.chat.search import SCAN_FIRST

    owner, member, outsider = make_user(), make_user(), make_user()
    group = make_group(lambda user: _api(cluster.gw1, user), owner, [member])
    base, now = (int(time.time() * 1000) << 22) + 5000, int(time.time() * 1000)

    def persist(i, content):
        persist_group_message(storage, {
            "msg_id": str(base + i), "conversation_id": group["conversation_id"], "sender_id": int(owner.user_id),
            "to": None, "group_id": int(group["group_id"]), "client_msg_id": f"g-bulk-{i}", "message_type": "text",
            "content": content, "extra": {}, "timestamp": now})
    persist(0, "团建地点定在杭州")
    for i in range(1, SCAN_FIRST + 20):
        persist(i, f"group filler {i}")
    assert _found(cluster.gw1, member, q="团建") == [str(base)]
    assert _found(cluster.gw1, member, q="团建", conversation_id=group["conversation_id"]) == [str(base)]
    assert _found(cluster.gw1, owner, q="杭州") == [str(base)]
    assert _found(cluster.gw1, outsider, q="团建") == []
