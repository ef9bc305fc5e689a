"""Unread counts (app.chat.unread) and reads (app.chat.receipts), private and in groups."""
import time

import pytest

from app.chat.conversations import list_conversations
from app.chat.groups import create_group
from app.chat.receipts import mark_read
from app.chat.unread import rebuild_unread, unread_counts
from app.errors import Forbidden, NotFound
from tests.harness import flush_redis_keeping_claim


def test_unread_counts_per_conversation_and_none_for_ones_own_messages(chat, make_user, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    from_alice = [chat.message(alice, bob, f"a{i}") for i in range(3)]
    from_carol = [chat.message(carol, bob, f"c{i}") for i in range(2)]

    assert unread_counts(storage, bob) == {from_alice[0].conversation_id: 3, from_carol[0].conversation_id: 2}
    assert unread_counts(storage, alice) == {} and unread_counts(storage, carol) == {}
    listed = {c["conversation_id"]: (c["unread"], c["last_message"]) for c in list_conversations(storage, bob)}
    assert listed == {from_alice[0].conversation_id: (3, "a2"), from_carol[0].conversation_id: (2, "c1")}


def test_a_redelivered_dispatch_does_not_count_a_message_twice(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "once")
    chat.redeliver(chat.published)
    assert unread_counts(storage, bob) == {ack.conversation_id: 1}


def test_reading_up_to_a_message_clears_it_and_what_came_before_and_tells_the_sender(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    acks = [chat.message(alice, bob, f"m{i}") for i in range(4)]
    outcome = mark_read(storage, bob, acks[0].conversation_id, acks[1].msg_id)

    assert (outcome.reader, outcome.peer, outcome.unread_left) == (bob, alice, 2)
    assert unread_counts(storage, bob) == {acks[0].conversation_id: 2}
    # A read from a slower device that arrives late moves nothing back.
    assert mark_read(storage, bob, acks[0].conversation_id, acks[0].msg_id).unread_left == 2
    listed, = list_conversations(storage, bob)
    assert listed["last_read_msg_id"] == str(acks[1].msg_id) and listed["unread"] == 2
    assert mark_read(storage, bob, acks[0].conversation_id, acks[3].msg_id).unread_left == 0
    assert unread_counts(storage, bob) == {}


def test_reading_a_conversation_one_is_not_in_is_refused(chat, make_user, storage):
    alice, bob, mallory = make_user(), make_user(), make_user()
    ack = chat.message(alice, bob, "private")
    with pytest.raises(Forbidden):
        mark_read(storage, mallory, ack.conversation_id, ack.msg_id)
    with pytest.raises(NotFound):
        mark_read(storage, mallory, f"p_{min(alice, mallory)}_{max(alice, mallory)}", ack.msg_id)  # never written
    assert unread_counts(storage, bob) == {ack.conversation_id: 1}


def test_counts_rebuilt_after_redis_lost_them_equal_the_counts_before(chat, make_user, storage):
    alice, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, alice, "trio", [bob, carol])
    for i in range(3):
        chat.message(alice, bob, f"p{i}")
    for i in range(2):
        chat.message(carol, group_id=group.group_id, content=f"g{i}")
    last = chat.message(alice, group_id=group.group_id, content="g2")
    mark_read(storage, carol, group.conversation_id, last.msg_id)
    before = {user: unread_counts(storage, user) for user in (alice, bob, carol)}
    assert before[bob] == {chat.published[0]["conversation_id"]: 3, group.conversation_id: 3}
    assert before[alice] == {group.conversation_id: 2} and before[carol] == {}

    flush_redis_keeping_claim(storage.redis)
    assert {user: unread_counts(storage, user) for user in (alice, bob, carol)} == before
    assert rebuild_unread(storage, [bob])[bob] == before[bob]
    # Counting goes on from the rebuilt numbers. (The sends' dedupe side of a Redis loss is
    # test_intake's subject: here Redis remembers sends from long ago again, as the fixture set it.)
    storage.redis.set("dedupe:since", int((time.time() - storage.settings.dedupe_ttl_seconds - 3600) * 1000))
    chat.message(carol, bob, "after the flush")
    assert sum(unread_counts(storage, bob).values()) == 7


def test_a_group_read_tells_the_author_and_counts_per_member(chat, make_user, storage):
    owner, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "team", [bob, carol])
    first = chat.message(carol, group_id=group.group_id, content="from Carol")
    second = chat.message(owner, group_id=group.group_id, content="from the owner")

    assert unread_counts(storage, bob) == {group.conversation_id: 2}
    assert unread_counts(storage, carol) == {group.conversation_id: 1}  # not her own message
    read = mark_read(storage, bob, group.conversation_id, first.msg_id)
    assert (read.peer, read.unread_left) == (carol, 1)  # the receipt goes to that message's author
    read = mark_read(storage, carol, group.conversation_id, first.msg_id)
    assert read.peer is None  # no receipt for reading one's own message
    assert mark_read(storage, bob, group.conversation_id, second.msg_id).peer == owner
    assert unread_counts(storage, bob) == {} and unread_counts(storage, carol) == {group.conversation_id: 1}
