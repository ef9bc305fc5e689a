"""Recall (app.chat.recall): who may take a message back, and until when (the clock decides)."""
import pytest

from app.chat.conversations import history, list_conversations
from app.chat.groups import create_group
from app.chat.recall import RECALL_WINDOW_MS, RECALLED_PREVIEW, recall_message
from app.chat.sync import read_stream
from app.chat.unread import unread_counts
from app.errors import Forbidden, NotFound, RecallExpired
from app.wire import message_frame


def _history(storage, user_id, conversation_id):
    return history(storage, user_id, conversation_id, None, 50, message_frame)["messages"]


def test_the_sender_recalls_within_two_minutes_and_the_message_is_gone_for_both(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "wrong chat!")
    assert unread_counts(storage, bob) == {ack.conversation_id: 1}
    clock.advance(RECALL_WINDOW_MS / 1000 - 1)

    outcome = recall_message(storage, alice, ack.msg_id, now_ms=clock.ms())
    assert (outcome.parties, outcome.recalled_at) == ([alice, bob], clock.ms())
    for user in (alice, bob):
        shown, = _history(storage, user, ack.conversation_id)
        assert (shown["msg_id"], shown["content"]) == (str(ack.msg_id), "")
        listed, = list_conversations(storage, user)
        assert listed["last_message"] == RECALLED_PREVIEW
    assert unread_counts(storage, bob) == {}  # nothing left to read


def test_after_two_minutes_the_sender_can_no_longer_recall(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "said and done")
    clock.advance(RECALL_WINDOW_MS / 1000 + 1)
    with pytest.raises(RecallExpired, match="2 minutes"):
        recall_message(storage, alice, ack.msg_id, now_ms=clock.ms())
    assert _history(storage, bob, ack.conversation_id)[0]["content"] == "said and done"


def test_only_the_sender_recalls_a_private_message_and_strangers_learn_nothing(chat, make_user, storage, clock):
    alice, bob, mallory = make_user(), make_user(), make_user()
    ack = chat.message(alice, bob, "mine")
    with pytest.raises(Forbidden, match="only the sender"):
        recall_message(storage, bob, ack.msg_id, now_ms=clock.ms())
    with pytest.raises(NotFound):  # the same answer as for an id that does not exist
        recall_message(storage, mallory, ack.msg_id, now_ms=clock.ms())
    with pytest.raises(NotFound):
        recall_message(storage, alice, ack.msg_id + 1, now_ms=clock.ms() + RECALL_WINDOW_MS * 10)
    assert _history(storage, bob, ack.conversation_id)[0]["content"] == "mine"


def test_recalling_again_changes_nothing_and_adds_no_second_entry(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "twice?")
    first = recall_message(storage, alice, ack.msg_id, now_ms=clock.ms())
    clock.advance(RECALL_WINDOW_MS / 1000 * 3)  # a retry long after: still answered, not "expired"
    again = recall_message(storage, alice, ack.msg_id, now_ms=clock.ms())

    assert again.recalled_at == first.recalled_at
    entries = read_stream(storage, bob, 0, 100, message_frame).entries
    assert [e["type"] for e in entries] == ["message", "recalled"]


def test_a_group_owner_recalls_any_message_at_any_time_a_member_only_their_own(chat, make_user, storage, clock):
    owner, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "moderated", [bob, carol])
    by_bob = chat.message(bob, group_id=group.group_id, content="spam")
    by_carol = chat.message(carol, group_id=group.group_id, content="fine")

    with pytest.raises(Forbidden, match="group owner"):
        recall_message(storage, bob, by_carol.msg_id, now_ms=clock.ms())
    clock.advance(3600)
    with pytest.raises(RecallExpired):
        recall_message(storage, bob, by_bob.msg_id, now_ms=clock.ms())
    outcome = recall_message(storage, owner, by_bob.msg_id, now_ms=clock.ms())

    assert outcome.parties == sorted([owner, bob, carol])
    contents = [m["content"] for m in _history(storage, carol, group.conversation_id)]
    assert contents == ["fine", ""]  # newest first
    assert unread_counts(storage, carol) == {}  # Carol's unread was only Bob's message
    assert unread_counts(storage, owner) == {group.conversation_id: 1}
