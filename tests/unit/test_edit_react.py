"""Edits and reactions (app.chat.edits, app.chat.reactions): who may, until when, and what
every party's history and stream show afterwards (the clock decides the window)."""
import threading

import pytest
from sqlalchemy import select

from app.chat.conversations import history, list_conversations
from app.chat.edits import edit_message, message_versions
from app.chat.groups import add_members, create_group, remove_member
from app.chat.reactions import MAX_DISTINCT_EMOJI, clean_emoji, react
from app.chat.recall import recall_message
from app.chat.search import search_messages
from app.chat.sync import read_stream
from app.errors import EditExpired, Forbidden, InvalidInput, NotFound
from app.wire import message_frame
from models import PushLog, SyncEntry

WINDOW = 900


def _history(storage, user_id, conversation_id):
    return history(storage, user_id, conversation_id, None, 50, message_frame)["messages"]


def _stream(storage, user_id):
    """The user's stream without group changes (tests/test_group_events.py covers those)."""
    return [e for e in read_stream(storage, user_id, 0, 500, message_frame).entries if e["type"] != "group_event"]


def test_the_sender_edits_and_both_sides_see_the_latest_text_and_an_edited_entry(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "meet at noon")
    assert _history(storage, bob, ack.conversation_id)[0]["edited_at"] is None
    clock.advance(WINDOW - 1)

    outcome = edit_message(storage, alice, ack.msg_id, "meet at dinner", WINDOW, now_ms=clock.ms())
    assert (outcome.parties, outcome.edited_at) == ([alice, bob], clock.ms())
    for user in (alice, bob):
        shown, = _history(storage, user, ack.conversation_id)
        assert (shown["content"], shown["edited_at"]) == ("meet at dinner", clock.ms())
        message, edited = _stream(storage, user)
        assert (message["content"], message["edited_at"]) == ("meet at dinner", clock.ms())
        assert edited == {"type": "edited", "msg_id": str(ack.msg_id), "conversation_id": ack.conversation_id,
                          "content": "meet at dinner", "edited_at": clock.ms()}
        assert list_conversations(storage, user)[0]["last_message"] == "meet at dinner"
    assert [m["msg_id"] for m in search_messages(storage, bob, "dinner", None, None, 10, message_frame)["messages"]] \
        == [str(ack.msg_id)]
    assert search_messages(storage, bob, "noon", None, None, 10, message_frame)["messages"] == []


def test_each_edit_is_its_own_entry_and_a_retry_adds_none(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "v1")
    edit_message(storage, alice, ack.msg_id, "v2", WINDOW, now_ms=clock.ms())
    clock.advance(1)
    second = edit_message(storage, alice, ack.msg_id, "v3", WINDOW, now_ms=clock.ms())
    clock.advance(WINDOW * 2)  # a retry long after: answered the same, not "expired"
    retry = edit_message(storage, alice, ack.msg_id, "v3", WINDOW, now_ms=clock.ms())

    assert (retry.edit_id, retry.edited_at) == (second.edit_id, second.edited_at)
    assert [(e["type"], e["content"]) for e in _stream(storage, bob)] == [
        ("message", "v3"), ("edited", "v2"), ("edited", "v3")]
    assert [v["content"] for v in message_versions(storage, ack.msg_id)] == ["v1", "v2", "v3"]
    with pytest.raises(InvalidInput, match="already"):  # unchanged and never edited that way: nothing to do
        edit_message(storage, alice, chat.message(alice, bob, "same").msg_id, "same", WINDOW, now_ms=clock.ms())


def test_only_the_sender_edits_within_the_window_never_a_recalled_message(chat, make_user, storage, clock):
    alice, bob, mallory = make_user(), make_user(), make_user()
    ack = chat.message(alice, bob, "mine")
    with pytest.raises(Forbidden, match="only the sender"):
        edit_message(storage, bob, ack.msg_id, "yours", WINDOW, now_ms=clock.ms())
    with pytest.raises(NotFound):  # the same answer as for an id that does not exist
        edit_message(storage, mallory, ack.msg_id, "theirs", WINDOW, now_ms=clock.ms())
    with pytest.raises(NotFound):
        edit_message(storage, alice, ack.msg_id + 1, "ghost", WINDOW, now_ms=clock.ms() + WINDOW * 10_000)
    clock.advance(WINDOW + 1)
    with pytest.raises(EditExpired):
        edit_message(storage, alice, ack.msg_id, "too late", WINDOW, now_ms=clock.ms())

    fresh = chat.message(alice, bob, "oops")
    edit_message(storage, alice, fresh.msg_id, "secret", WINDOW, now_ms=clock.ms())
    recall_message(storage, alice, fresh.msg_id, now_ms=clock.ms())
    with pytest.raises(Forbidden, match="recalled"):
        edit_message(storage, alice, fresh.msg_id, "back", WINDOW, now_ms=clock.ms())
    with pytest.raises(Forbidden, match="recalled"):
        react(storage, bob, fresh.msg_id, "👍", "add", now_ms=clock.ms())
    # A recalled message's earlier versions are gone too, in the stream and in storage.
    assert [e.get("content") for e in _stream(storage, bob) if e["msg_id"] == str(fresh.msg_id)] == ["", "", None]
    assert {v["content"] for v in message_versions(storage, fresh.msg_id)} == {""}
    assert _history(storage, bob, ack.conversation_id)[-1]["content"] == "mine"


def test_reactions_are_stored_once_per_user_and_emoji_and_shown_everywhere(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "lunch?")
    assert _history(storage, bob, ack.conversation_id)[0]["reactions"] == {}

    assert react(storage, bob, ack.msg_id, "👍", "add", now_ms=clock.ms()).changed
    assert react(storage, alice, ack.msg_id, "👍", "add", now_ms=clock.ms()).changed
    assert react(storage, alice, ack.msg_id, "🍕", "add", now_ms=clock.ms()).changed
    assert not react(storage, alice, ack.msg_id, "🍕", "add", now_ms=clock.ms()).changed  # twice: nothing new
    assert not react(storage, bob, ack.msg_id, "🍕", "remove", now_ms=clock.ms()).changed  # absent: nothing
    assert react(storage, alice, ack.msg_id, "👍", "remove", now_ms=clock.ms()).changed

    expected = {"👍": [str(bob)], "🍕": [str(alice)]}
    for user in (alice, bob):
        assert _history(storage, user, ack.conversation_id)[0]["reactions"] == expected
        message, *reactions = _stream(storage, user)
        assert message["reactions"] == expected
        assert [(r["type"], r["user_id"], r["emoji"], r["op"]) for r in reactions] == [
            ("reaction", str(bob), "👍", "add"), ("reaction", str(alice), "👍", "add"),
            ("reaction", str(alice), "🍕", "add"), ("reaction", str(alice), "👍", "remove")]


def test_a_message_takes_at_most_twenty_distinct_emoji(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "vote")
    emoji = [chr(0x1F600 + i) for i in range(MAX_DISTINCT_EMOJI + 1)]
    for e in emoji[:MAX_DISTINCT_EMOJI]:
        react(storage, bob, ack.msg_id, e, "add", now_ms=clock.ms())
    with pytest.raises(InvalidInput, match="at most 20"):
        react(storage, alice, ack.msg_id, emoji[-1], "add", now_ms=clock.ms())
    react(storage, alice, ack.msg_id, emoji[0], "add", now_ms=clock.ms())  # one already there: fine
    assert len(_history(storage, alice, ack.conversation_id)[0]["reactions"]) == MAX_DISTINCT_EMOJI


@pytest.mark.parametrize("emoji", ["👍", "👨‍👩‍👧‍👦", "👍🏽", "🇫🇷", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "1️⃣", "❤️"])
def test_emoji_sequences_are_accepted(emoji):
    assert clean_emoji(emoji) == emoji


@pytest.mark.parametrize("emoji", ["", None, 5, "lol", "+1", "👍 ", " 👍", "👍\n", "\u0000", "é", "👍" * 9, "\ud800"])
def test_text_whitespace_controls_and_oversized_emoji_are_refused(emoji):
    with pytest.raises(InvalidInput):
        clean_emoji(emoji)


def test_in_a_group_a_late_joiner_cannot_see_edit_or_react_to_earlier_messages(chat, make_user, storage, clock):
    owner, bob, late = make_user(), make_user(), make_user()
    group = create_group(storage, owner, "team", [bob])
    early = chat.message(bob, group_id=group.group_id, content="before you came")
    add_members(storage, owner, group.group_id, [late])
    after = chat.message(bob, group_id=group.group_id, content="welcome")

    with pytest.raises(NotFound):
        react(storage, late, early.msg_id, "👀", "add", now_ms=clock.ms())
    edited = edit_message(storage, bob, early.msg_id, "before you came (edited)", WINDOW, now_ms=clock.ms())
    assert edited.parties == sorted([owner, bob])
    assert react(storage, late, after.msg_id, "👋", "add", now_ms=clock.ms()).parties == sorted([owner, bob, late])
    assert [(e["type"], e["msg_id"]) for e in _stream(storage, late)] == [
        ("message", str(after.msg_id)), ("reaction", str(after.msg_id))]
    assert [e["type"] for e in _stream(storage, owner)] == ["message", "message", "edited", "reaction"]

    remove_member(storage, owner, group.group_id, bob)  # gone: no more edits or reactions from them
    with pytest.raises(Forbidden, match="no longer a member"):
        react(storage, bob, after.msg_id, "👋", "add", now_ms=clock.ms())
    with pytest.raises(Forbidden, match="no longer a member"):
        edit_message(storage, bob, after.msg_id, "bye", WINDOW, now_ms=clock.ms())


def test_concurrent_edits_and_reactions_leave_every_stream_gap_free_with_each_entry_once(
        chat, make_user, storage, clock):
    alice, bob, carol = make_user(), make_user(), make_user()
    group = create_group(storage, alice, "busy", [bob, carol])
    acks = [chat.message(sender, group_id=group.group_id, content=f"m{i}")
            for i, sender in enumerate((alice, bob, carol, alice))]
    errors = []

    def work(user, i):
        try:
            for n, ack in enumerate(acks):
                react(storage, user, ack.msg_id, chr(0x1F600 + i), "add", now_ms=clock.ms())
                if chat_sender[ack.msg_id] == user:
                    edit_message(storage, user, ack.msg_id, f"m{n} by {user} #{i}", WINDOW, now_ms=clock.ms())
        except Exception as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    chat_sender = {ack.msg_id: sender for ack, sender in zip(acks, (alice, bob, carol, alice))}
    threads = [threading.Thread(target=work, args=(user, i)) for i, user in enumerate((alice, bob, carol) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []

    with storage.sessions() as session:
        for user in (alice, bob, carol):
            seqs = [row.seq for row in session.query(SyncEntry).filter_by(user_id=user).order_by(SyncEntry.seq)]
            assert seqs == list(range(1, len(seqs) + 1))  # consecutive: nothing skipped
    for user in (alice, bob, carol):
        entries = _stream(storage, user)
        keys = [(e["type"], e["msg_id"], e.get("user_id"), e.get("emoji"), e.get("content")) for e in entries]
        assert len(keys) == len(set(keys))  # nothing twice
        assert sum(e["type"] == "reaction" for e in entries) == 6 * len(acks)  # 3 users x 2 emoji x 4 messages
        assert sum(e["type"] == "edited" for e in entries) == 2 * 4  # 2 threads each: alice 2 msgs, bob 1, carol 1


def test_a_push_not_sent_yet_shows_the_new_text_and_a_sent_one_keeps_its_own(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    ack = chat.message(alice, bob, "call me at 5")
    payload = {"title": "alice", "body": "call me at 5", "badge": 1, "conversation_id": ack.conversation_id,
               "msg_id": str(ack.msg_id), "preview": True}
    with storage.session() as session:
        for target, status in (("device:1", "pending"), ("device:2", "success")):
            session.add(PushLog(user_id=bob, message_id=ack.msg_id, push_type="apns", push_status=status,
                                target=target, payload=payload))
    edit_message(storage, alice, ack.msg_id, "call me at 6", WINDOW, now_ms=clock.ms())
    with storage.sessions() as session:
        bodies = dict(session.execute(select(PushLog.target, PushLog.payload).where(
            PushLog.message_id == ack.msg_id)).all())
    assert bodies["device:1"] == {**payload, "body": "call me at 6"}
    assert bodies["device:2"] == payload


def test_a_fan_out_chunk_that_loaded_the_message_before_an_edit_shows_the_new_text(chat, make_user, storage, clock):
    from app.chat.group_messages import _write_streams, persist_group_message
    from models import Message

    owner, bob = make_user(), make_user()
    group = create_group(storage, owner, "race", [bob])
    ack = chat.send(owner, group_id=group.group_id, content="draft")
    payload, = chat._queued
    persist_group_message(storage, payload)  # stored; no member's chunk has run yet
    with storage.sessions() as session:
        stale = session.get(Message, ack.msg_id)  # what a chunk loaded just before the edit
    edit_message(storage, owner, ack.msg_id, "final", WINDOW, now_ms=clock.ms())

    _write_streams(storage, stale, [owner, bob], "someone: draft")
    assert (stale.content, stale.edited_at) == ("final", clock.ms())  # the live frame is built from it
    assert message_frame(stale)["content"] == "final"
    assert list_conversations(storage, bob)[0]["last_message"] == "someone: final"
    assert [(e["type"], e["content"]) for e in _stream(storage, bob)] == [("message", "final")]


def test_a_user_the_peer_blocked_can_neither_edit_nor_react_in_that_chat(chat, make_user, storage, clock):
    from app.accounts.blocks import block_user

    alice, bob = make_user(), make_user()
    mine, theirs = chat.message(alice, bob, "hi bob"), chat.message(bob, alice, "hi alice")
    block_user(storage, bob, alice)
    with pytest.raises(Forbidden, match="cannot message"):
        edit_message(storage, alice, mine.msg_id, "hi bob!!", WINDOW, now_ms=clock.ms())
    with pytest.raises(Forbidden, match="cannot message"):
        react(storage, alice, theirs.msg_id, "👍", "add", now_ms=clock.ms())
    assert react(storage, bob, mine.msg_id, "👎", "add", now_ms=clock.ms()).changed  # the blocker still may
    assert [e["type"] for e in _stream(storage, bob)] == ["message", "message", "reaction"]
