"""The chat REST API a client shows its screens from: conversation list, history, unread, presence."""
import requests

from app.chat.presence import now_ms
from tests.harness import flush_redis_keeping_claim, wait_until


def _get(gateway, user, path, **params):
    """GET an /api path as `user` (bearer token); `user=None` sends no token."""
    headers = {"Authorization": f"Bearer {user.token}"} if user is not None else {}
    return requests.get(f"{gateway.http}/api{path}", headers=headers, params=params, timeout=10)


def _ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def _conversations(gateway, user) -> list[dict]:
    return _ok(_get(gateway, user, "/conversations"))["conversations"]


def _by_id(conversations: list[dict]) -> dict[str, dict]:
    return {c["conversation_id"]: c for c in conversations}


def _assert_json_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["error"] == code and body["message"], body


def test_the_conversation_list_shows_each_chat_newest_first_with_its_last_message_and_unread(
        cluster, make_user, connect, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    b = connect(bob, cluster.gw2)
    a, c = connect(alice, cluster.gw1), connect(carol, cluster.gw2)
    first = a.send_message(bob.user_id, "hi Bob")
    second = a.send_message(bob.user_id, "are you there?")
    from_carol = c.send_message(bob.user_id, "lunch at noon")
    for ack in (first, second, from_carol):
        assert ack["type"] == "ack", ack
        b.wait_message(ack["msg_id"])  # delivered, so stored (and Bob's cached list dropped)
    with_alice, with_carol = first["conversation_id"], from_carol["conversation_id"]
    assert second["conversation_id"] == with_alice != with_carol

    def counted():
        items = _conversations(cluster.gw1, bob)
        return items if [(i["conversation_id"], i["unread"]) for i in items] == [(with_carol, 1), (with_alice, 2)] \
            else None

    items = wait_until(counted, what="Bob's list: Carol's chat (1 unread) above Alice's (2 unread)")
    carol_item, alice_item = items
    assert carol_item["is_group"] is False and carol_item["group_id"] is None
    assert carol_item["peer"] == {"user_id": carol.user_id, "username": carol.username}
    assert carol_item["last_message"] == "lunch at noon"
    assert carol_item["last_msg_id"] == from_carol["msg_id"]
    assert carol_item["last_message_time"] == from_carol["timestamp"]
    assert alice_item["peer"] == {"user_id": alice.user_id, "username": alice.username}
    assert alice_item["last_message"] == "are you there?"  # the newer of Alice's two
    assert alice_item["last_msg_id"] == second["msg_id"]
    assert alice_item["last_message_time"] == second["timestamp"]

    # Bob reads Alice's chat: it drops to 0 unread, Carol's keeps its 1.
    b.send_json({"type": "read", "conversation_id": with_alice, "msg_id": second["msg_id"]})
    read_ok = b.next_frame(lambda f: f["type"] in ("read_ok", "error"))
    assert {k: v for k, v in read_ok.items() if k != "_taken"} == {
        "type": "read_ok", "conversation_id": with_alice, "msg_id": second["msg_id"]}, read_ok
    after_read = _conversations(cluster.gw2, bob)
    assert [(i["conversation_id"], i["unread"]) for i in after_read] == [(with_carol, 1), (with_alice, 0)]
    assert _by_id(after_read)[with_alice]["last_read_msg_id"] == second["msg_id"]

    # The list is cached per user and dropped when a new message to that user is stored.
    cache_key = f"conversations:{bob.user_id}"
    assert storage.redis.exists(cache_key) == 1, "a GET leaves Bob's list in the cache"
    third = a.send_message(bob.user_id, "ok, talk later")
    assert third["type"] == "ack", third
    wait_until(lambda: not storage.redis.exists(cache_key), what="Bob's cached list to be dropped")
    newest = _conversations(cluster.gw1, bob)
    assert [i["conversation_id"] for i in newest] == [with_alice, with_carol]  # Alice's chat moves to the top
    assert newest[0]["last_message"] == "ok, talk later" and newest[0]["last_msg_id"] == third["msg_id"]
    wait_until(lambda: _by_id(_conversations(cluster.gw1, bob))[with_alice]["unread"] == 1,
               what="the new message counted unread")

    # Alice's own list has the chat too, with nothing unread (her own messages).
    alice_list = _conversations(cluster.gw1, alice)
    assert [(i["conversation_id"], i["unread"], i["last_msg_id"]) for i in alice_list] == [
        (with_alice, 0, third["msg_id"])]
    assert alice_list[0]["peer"] == {"user_id": bob.user_id, "username": bob.username}


def test_a_list_being_loaded_while_a_message_is_stored_does_not_hide_that_message(
        cluster, make_user, connect, storage, monkeypatch):
    """A GET reads MySQL, the message is stored and the cache dropped, then the GET caches what it read.

    Bob's list must still come to show the new message (it is cached for an hour).
    Through the gateways this happens by chance (GETs polled while messages
    arrive); here the GET runs in this process with the message arriving
    between its read and its cache write.
    """
    import app.chat.conversations as conversations

    alice, bob = make_user(), make_user()
    a, b = connect(alice, cluster.gw1), connect(bob, cluster.gw2)
    first = a.send_message(bob.user_id, "first")
    b.wait_message(first["msg_id"])
    arrived = {}
    load = conversations._load_conversations

    def load_while_a_message_arrives(storage_, user_id):
        items = load(storage_, user_id)
        arrived["ack"] = a.send_message(bob.user_id, "second")
        b.wait_message(arrived["ack"]["msg_id"])  # stored, and Bob's cached list dropped
        return items

    monkeypatch.setattr(conversations, "_load_conversations", load_while_a_message_arrives)
    slow = conversations.list_conversations(storage, int(bob.user_id))
    monkeypatch.undo()
    assert slow[0]["last_msg_id"] == first["msg_id"]  # that GET read before "second" was stored
    second = arrived["ack"]

    wait_until(lambda: _conversations(cluster.gw1, bob)[0]["last_msg_id"] == second["msg_id"],
               what=f"Bob's list to show 'second' (at first it showed {_conversations(cluster.gw1, bob)[0]['last_message']!r})")


def test_history_pages_backwards_through_every_message_once_and_only_members_may_read_it(
        cluster, make_user, connect):
    alice, bob, carol = make_user(), make_user(), make_user()
    a = connect(alice, cluster.gw1)
    acks = [a.send_message(bob.user_id, f"message {i}") for i in range(5)]
    assert all(ack["type"] == "ack" for ack in acks), acks
    conversation = acks[0]["conversation_id"]
    path = f"/conversations/{conversation}/messages"
    wait_until(lambda: len(_ok(_get(cluster.gw2, bob, path))["messages"]) == 5, what="all 5 messages stored")

    whole = _ok(_get(cluster.gw2, bob, path))
    assert whole["has_more"] is False and whole["next_before"] is None
    assert [m["content"] for m in whole["messages"]] == [f"message {i}" for i in (4, 3, 2, 1, 0)]  # newest first
    newest = whole["messages"][0]
    assert newest["type"] == "message" and newest["msg_id"] == acks[4]["msg_id"]
    assert newest["from"] == alice.user_id and newest["to"] == bob.user_id
    assert newest["conversation_id"] == conversation and newest["client_msg_id"] == acks[4]["client_msg_id"]
    assert newest["timestamp"] == acks[4]["timestamp"] and newest["message_type"] == "text"

    # Page through two at a time, for both people in the chat.
    expected = sorted((ack["msg_id"] for ack in acks), key=int, reverse=True)
    for reader, gateway in ((bob, cluster.gw1), (alice, cluster.gw2)):
        seen, pages, before = [], [], None
        while True:
            params = {"limit": 2} if before is None else {"limit": 2, "before": before}
            page = _ok(_get(gateway, reader, path, **params))
            ids = [m["msg_id"] for m in page["messages"]]
            pages.append((len(ids), page["has_more"]))
            seen += ids
            if not page["has_more"]:
                assert page["next_before"] is None
                break
            assert page["next_before"] == ids[-1], page
            before = page["next_before"]
            assert len(pages) < 10, f"paging does not end: {pages}"
        assert pages == [(2, True), (2, True), (1, False)]
        assert seen == expected  # each once, in descending msg_id order

    # Someone outside the chat, a chat no one has, bad paging, no token.
    _assert_json_error(_get(cluster.gw1, carol, path), 403, "forbidden")
    _assert_json_error(_get(cluster.gw1, carol, "/conversations/p_999999998_999999999/messages"), 404, "not_found")
    for bad in ("0", "abc", "500"):
        _assert_json_error(_get(cluster.gw1, bob, path, limit=bad), 400, "invalid_request")
    _assert_json_error(_get(cluster.gw1, None, path), 401, "unauthorized")
    _assert_json_error(_get(cluster.gw1, None, "/conversations"), 401, "unauthorized")


def test_unread_totals_per_conversation_survive_a_redis_flush(cluster, make_user, connect, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    a, c = connect(alice, cluster.gw1), connect(carol, cluster.gw2)
    from_alice = [a.send_message(bob.user_id, f"from alice {i}") for i in range(2)]
    from_carol = [c.send_message(bob.user_id, f"from carol {i}") for i in range(3)]
    assert all(ack["type"] == "ack" for ack in from_alice + from_carol)
    expected = {"conversations": {from_alice[0]["conversation_id"]: 2, from_carol[0]["conversation_id"]: 3},
                "total": 5}

    wait_until(lambda: _ok(_get(cluster.gw1, bob, "/unread")) == expected, what="Bob's unread: 2 + 3")
    assert _ok(_get(cluster.gw2, alice, "/unread")) == {"conversations": {}, "total": 0}  # own messages
    unread_key = f"unread:{bob.user_id}"
    assert storage.redis.hget(unread_key, from_carol[0]["conversation_id"]) == "3"  # served from Redis

    flush_redis_keeping_claim(storage.redis)
    assert not storage.redis.exists(unread_key)

    assert _ok(_get(cluster.gw2, bob, "/unread")) == expected  # recounted from MySQL
    assert storage.redis.hget(unread_key, from_alice[0]["conversation_id"]) == "2"  # and cached again
    assert _ok(_get(cluster.gw1, bob, "/unread")) == expected


def test_presence_shows_online_while_connected_then_offline_with_last_seen(cluster, make_user, connect):
    bob, carol = make_user(), make_user()
    path = f"/users/{bob.user_id}/presence"
    assert _ok(_get(cluster.gw1, carol, path)) == {"user_id": bob.user_id, "online": False, "last_seen": None}

    connected_at = now_ms()
    b = connect(bob, cluster.gw2)
    online = _ok(_get(cluster.gw1, carol, path))  # asked on the other gateway
    assert online["user_id"] == bob.user_id and online["online"] is True

    b.close()
    offline = wait_until(lambda: (lambda p: p if p["online"] is False else None)(_ok(_get(cluster.gw1, carol, path))),
                         what="Bob shown offline")
    last_seen = offline["last_seen"]
    assert isinstance(last_seen, int) and not isinstance(last_seen, bool), offline
    assert connected_at <= last_seen <= now_ms(), (connected_at, offline)
    assert now_ms() - last_seen < 60_000

    _assert_json_error(_get(cluster.gw1, carol, "/users/999999999/presence"), 404, "not_found")
    _assert_json_error(_get(cluster.gw1, None, path), 401, "unauthorized")
