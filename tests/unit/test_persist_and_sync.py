"""Persist (app.chat.persist), dispatch (app.chat.dispatch) and the sync stream (app.chat.sync)."""
import json
import threading

import pytest
from sqlalchemy import func, select

from app.chat.conversations import private_conversation_id
from app.chat.persist import persist_private_messages
from app.chat.presence import DELIVERY_CHANNEL, Presence
from app.chat.recall import recall_message
from app.chat.sync import MAX_LIMIT, parse_cursor, parse_limit, read_stream
from app.errors import InvalidInput
from app.wire import message_frame
from models import Message, SyncEntry
from tests.harness import wait_until


def _sync(storage, user_id, after=0, limit=100):
    return read_stream(storage, user_id, after, limit, message_frame)


def _everything(storage, user_id):
    """A client's whole sync from the start, page after page."""
    entries, after = [], 0
    while True:
        page = _sync(storage, user_id, after)
        entries += page.entries
        after = int(page.cursor)
        if not page.has_more:
            return entries


def _stream_positions(storage, user_id):
    with storage.sessions() as session:
        return list(session.scalars(select(SyncEntry.seq).where(SyncEntry.user_id == user_id)
                                    .order_by(SyncEntry.seq)))


def _stored_count(storage, conversation_id):
    with storage.sessions() as session:
        return session.scalar(select(func.count()).select_from(Message)
                              .where(Message.conversation_id == conversation_id))


def test_a_redelivered_message_is_stored_once_and_each_stream_holds_it_once(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    acks = [chat.send(alice, bob, f"m{i}") for i in range(3)]
    first = chat.deliver()
    again = chat.redeliver(chat.published)  # the worker died before acking its batch

    assert all(outcome.stored for outcome, _ in first.values())
    assert [(outcome.stored, outcome.dispatch) for outcome, _ in again.values()] == [(False, True)] * 3
    assert _stored_count(storage, acks[0].conversation_id) == 3
    for user in (alice, bob):
        assert [e["content"] for e in _everything(storage, user)] == ["m0", "m1", "m2"]
        assert _stream_positions(storage, user) == [1, 2, 3]


def test_a_batch_holding_one_stored_message_stores_the_new_ones_without_gaps(chat, make_user, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    chat.send(alice, bob, "early")
    chat.deliver()
    chat.send(alice, bob, "new to Bob")
    chat.send(carol, bob, "new from Carol")
    outcomes = chat.redeliver(chat.published)  # the stored one comes back with two new ones

    assert sorted(outcome.stored for outcome, _ in outcomes.values()) == [False, True, True]
    assert [e["content"] for e in _everything(storage, bob)] == ["early", "new to Bob", "new from Carol"]
    assert _stream_positions(storage, bob) == [1, 2, 3]
    assert _stream_positions(storage, carol) == [1]


def test_a_second_copy_of_a_send_under_another_id_is_dropped(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    ack = chat.send(alice, bob, "one", client_msg_id="c-1")
    chat.deliver()
    copy = dict(chat.published[0], msg_id=str(chat.ids.next_id()))  # what a gateway that lost Redis made
    (outcome, dispatched), = chat.redeliver([copy]).values()

    assert (outcome.msg_id, outcome.stored, outcome.dispatch, dispatched) == (ack.msg_id, False, False, None)
    assert [e["msg_id"] for e in _everything(storage, bob)] == [str(ack.msg_id)]


def test_concurrent_persist_batches_leave_a_gap_free_stream(chat, make_user, storage):
    senders, bob = [make_user() for _ in range(4)], make_user()
    for sender in senders:
        for i in range(6):
            chat.send(sender, bob, f"{sender}:{i}")
    batches = [chat.published[i * 6:(i + 1) * 6] for i in range(4)]  # one batch per sender, as one gateway's
    errors = []

    def persist(batch):
        try:
            persist_private_messages(storage, batch)
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=persist, args=(batch,)) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _stream_positions(storage, bob) == list(range(1, 25))
    synced = [e["content"] for e in _everything(storage, bob)]
    for sender in senders:  # each sender's messages in the order they were sent
        assert [c for c in synced if c.startswith(f"{sender}:")] == [f"{sender}:{i}" for i in range(6)]


def test_sync_after_a_position_returns_exactly_what_was_missed_in_order_and_paged(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    chat.message(alice, bob, "seen before")
    seen = _sync(storage, bob)
    assert [e["content"] for e in seen.entries] == ["seen before"] and not seen.has_more

    for i in range(5):  # Bob is away
        chat.message(alice if i % 2 else bob, alice if i % 2 == 0 else bob, f"missed {i}")
    pages, after = [], int(seen.cursor)
    while True:
        page = _sync(storage, bob, after, limit=2)
        pages.append([e["content"] for e in page.entries])
        after = int(page.cursor)
        if not page.has_more:
            break
    assert pages == [["missed 0", "missed 1"], ["missed 2", "missed 3"], ["missed 4"]]
    exact = _sync(storage, bob, int(seen.cursor), limit=5)  # a page that takes exactly what is left
    assert (len(exact.entries), exact.cursor, exact.has_more) == (5, str(after), False)
    caught_up = _sync(storage, bob, after)
    assert (caught_up.entries, caught_up.cursor, caught_up.has_more) == ([], str(after), False)


def test_a_recall_reaches_the_stream_as_a_recalled_entry_after_the_message(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "oops")
    before = _sync(storage, bob)
    recall_message(storage, alice, ack.msg_id, now_ms=clock.ms() + 1000)

    after = _sync(storage, bob, int(before.cursor))
    assert after.entries == [{"type": "recalled", "msg_id": str(ack.msg_id), "conversation_id": ack.conversation_id,
                              "timestamp": clock.ms() + 1000, "by": "sender"}]
    replay = _sync(storage, bob)  # a new device syncing from the start sees no content
    assert replay.entries[0]["content"] == "" and replay.entries[1]["type"] == "recalled"


@pytest.mark.parametrize("cursor", ["-1", "1.5", "abc", 7, "9" * 20, "²"])
def test_a_cursor_the_server_did_not_return_is_refused(cursor):
    with pytest.raises(InvalidInput, match="cursor"):
        parse_cursor(cursor)


def test_sync_limits_are_checked_and_capped():
    assert (parse_cursor(None), parse_cursor("42"), parse_limit(None), parse_limit(10_000)) == (0, 42, 100, MAX_LIMIT)
    for bad in (0, -3, True, "10", 2.5):
        with pytest.raises(InvalidInput, match="limit"):
            parse_limit(bad)


def test_dispatch_sends_the_frame_to_every_other_live_connection_and_reports_offline_recipients(
        chat, make_user, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    presence = Presence(storage.redis)
    presence.connect(bob, "bob-phone", "gw-a", 0)
    presence.connect(alice, "alice-laptop", "gw-b", 0)
    presence.connect(alice, "conn-sender", "gw-b", 0)  # the connection the send came from
    channels = storage.redis.pubsub(ignore_subscribe_messages=True)
    channels.subscribe(DELIVERY_CHANNEL.format("gw-a"), DELIVERY_CHANNEL.format("gw-b"))
    wait_until(lambda: storage.redis.pubsub_numsub(DELIVERY_CHANNEL.format("gw-a"))[0][1] == 1,
               what="subscribed")
    try:
        to_bob = chat.send(alice, bob, "live")
        to_carol = chat.send(alice, carol, "later")
        outcomes = chat.deliver()

        received = {}

        def three_deliveries():
            raw = channels.get_message(timeout=0.1)  # None also for the subscribe confirmations
            if raw is not None:
                envelope = json.loads(raw["data"])
                frame = json.loads(envelope["frame"])
                received.update({(conn, frame["content"]): frame["msg_id"] for conn in envelope["conns"]})
            return len(received) >= 3

        wait_until(three_deliveries, timeout=5, what="the live frames on the gateways' channels")
        assert channels.get_message(timeout=0.2) is None  # and nothing else (not to the sending connection)
    finally:
        channels.close()
    assert received == {("bob-phone", "live"): str(to_bob.msg_id), ("alice-laptop", "live"): str(to_bob.msg_id),
                        ("alice-laptop", "later"): str(to_carol.msg_id)}
    assert outcomes[to_bob.msg_id][1].offline_users == []
    assert outcomes[to_carol.msg_id][1].offline_users == [carol]  # Carol gets a push instead


def test_connections_written_back_after_a_redis_flush_are_routable_at_once(storage):
    """A gateway puts its connections back after a flush; dispatch reading them meanwhile must not prune them.

    Dispatch deletes an entry whose gateway it does not know alive, so the gateway's flag has to be
    back before (or with) its entries, not after them.
    """
    presence = Presence(storage.redis)
    presence.connect(1, "bob-phone", "gw-a", 0)
    storage.redis.flushdb()  # the run's own db: Redis lost presence and the gateway flags
    presence.refresh([(1, "bob-phone", "gw-a", 0), (2, "carol-laptop", "gw-a", 0)], chunk=1)
    live = presence.live_connections([1, 2])
    assert [c.conn_id for c in live[1]] == ["bob-phone"] and [c.conn_id for c in live[2]] == ["carol-laptop"]
    assert [c.conn_id for c in presence.live_connections([1])[1]] == ["bob-phone"]  # not pruned by the read


def test_a_persist_task_from_before_replies_stores_the_message_with_no_reply_and_no_mentions(make_user, storage):
    """Tasks queued by a gateway of before revision 0016 carry neither `reply_to` nor `mentions`."""
    alice, bob = make_user(), make_user()

    def payload(msg_id, content, **fields):
        return {"msg_id": str(msg_id), "conversation_id": private_conversation_id(alice, bob), "sender_id": alice,
                "to": bob, "group_id": None, "client_msg_id": f"c{msg_id}", "message_type": "text",
                "content": content, "extra": {}, "timestamp": 1_700_000_000_000 + msg_id, "origin_conn": None,
                **fields}

    old = payload(9_001, "queued before the upgrade")
    new = payload(9_002, "a reply", reply_to="9001", mentions=[])
    persist_private_messages(storage, [old, new])
    frames = {f["msg_id"]: f for f in _everything(storage, bob)}
    assert (frames["9001"]["reply_to"], frames["9001"]["mentions"]) == (None, [])
    assert (frames["9002"]["reply_to"], frames["9002"]["mentions"]) == ("9001", [])
