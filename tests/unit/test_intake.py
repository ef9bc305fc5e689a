"""The gateway's intake of a send (app.chat.intake): dedupe, refusals, a Redis that forgot."""
import dataclasses
import threading

import pytest

from app.chat.conversations import history
from app.chat.groups import add_members, create_group
from app.chat.intake import DEDUPE_KEY, MessageIntake
from app.errors import Forbidden, InvalidInput, NotFound, Unavailable
from app.storage import Storage
from app.wire import message_frame
from tests.harness import flush_redis_keeping_claim


def _history(storage, user_id, conversation_id):
    return history(storage, user_id, conversation_id, None, 50, message_frame)["messages"]


def test_a_retried_send_gets_the_same_ack_and_is_published_once(chat, make_user, clock):
    alice, bob = make_user(), make_user()
    first = chat.send(alice, bob, "hi Bob", client_msg_id="retry-me")
    clock.advance(3)  # the client retries after a timeout
    again = chat.send(alice, bob, "hi Bob", client_msg_id="retry-me")

    assert again == first
    assert first.conversation_id == f"p_{min(alice, bob)}_{max(alice, bob)}"
    assert first.timestamp == clock.ms() - 3000  # the time the gateway first took it
    assert [p["msg_id"] for p in chat.published] == [str(first.msg_id)]


def test_a_retry_after_delivery_names_the_stored_message_and_the_chat_shows_it_once(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    first = chat.send(alice, bob, "once", client_msg_id="c-1")
    chat.deliver()
    again = chat.send(alice, bob, "once", client_msg_id="c-1")
    chat.deliver()

    assert again.msg_id == first.msg_id and len(chat.published) == 1
    assert [m["content"] for m in _history(storage, bob, first.conversation_id)] == ["once"]


def test_the_same_client_msg_id_from_two_senders_is_two_messages(chat, make_user):
    alice, bob = make_user(), make_user()
    a = chat.send(alice, bob, "from Alice", client_msg_id="same")
    b = chat.send(bob, alice, "from Bob", client_msg_id="same")
    assert a.msg_id != b.msg_id and a.conversation_id == b.conversation_id
    assert len(chat.published) == 2


def test_sends_to_nobody_or_to_oneself_are_refused_and_not_published(chat, make_user):
    alice = make_user()
    with pytest.raises(NotFound, match="does not exist"):
        chat.send(alice, 999_999_999, "anyone there?")
    with pytest.raises(InvalidInput, match="yourself"):
        chat.send(alice, alice, "note to self")
    assert chat.published == []


def test_only_current_members_send_to_a_group_and_a_refused_send_can_be_retried_once_added(
        chat, make_user, storage):
    owner, outsider = make_user(), make_user()
    group = create_group(storage, owner, "team", [])
    with pytest.raises(Forbidden, match="not a member"):
        chat.send(outsider, group_id=group.group_id, content="let me in", client_msg_id="g-1")
    with pytest.raises(NotFound, match="does not exist"):
        chat.send(owner, group_id=group.group_id + 1000, content="wrong group")
    assert chat.published == []
    assert not storage.redis.exists(DEDUPE_KEY.format(outsider, "g-1"))  # no record of a refused send

    # The same send, retried once the user is in, goes through.
    add_members(storage, owner, group.group_id, [outsider])
    ack = chat.send(outsider, group_id=group.group_id, content="let me in", client_msg_id="g-1")
    chat.deliver()
    assert [m["msg_id"] for m in _history(storage, owner, group.conversation_id)] == [str(ack.msg_id)]


def _pipeline_delivering_at_once(chat):
    """A broker whose persist worker stores what it takes at once, in queue order (a healthy pipeline)."""
    def publish(payloads, deadline=None, may_start=None):
        chat._publish(payloads, deadline, may_start)
        chat.deliver()
    return publish


def test_a_retry_after_redis_forgot_everything_is_acked_with_the_stored_id(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    first = chat.send(alice, bob, "kept", client_msg_id="c-2")
    chat.deliver()
    flush_redis_keeping_claim(storage.redis)  # Redis restarted empty: dedupe records and dedupe:since gone

    # In the risk window after the loss the ack waits until the send is stored, and names the
    # copy MySQL kept (UNIQUE(sender_id, client_msg_id)).
    intake = MessageIntake(storage, chat.ids, _pipeline_delivering_at_once(chat))
    again = intake.accept(alice, "conn-2", chat.request("c-2", bob, "kept"))
    assert again == first
    assert storage.redis.get("dedupe:since") is not None  # remembering again from now on
    assert [m["content"] for m in _history(storage, alice, first.conversation_id)] == ["kept"]


def test_in_recovery_a_retry_of_a_send_still_queued_is_acked_with_the_id_that_was_stored(
        chat, make_user, storage):
    alice, bob = make_user(), make_user()
    first = chat.send(alice, bob, "queued", client_msg_id="c-3")  # published; persist has not run yet
    flush_redis_keeping_claim(storage.redis)

    # A gateway after the loss: the first copy may still be queued, so the retry publishes no
    # copy of its own (it could be stored first) and its ack waits until persist, resuming a
    # moment later, stores the first copy.
    intake = MessageIntake(storage, chat.ids, _pipeline_delivering_at_once(chat))
    persist_resumes = threading.Timer(0.3, chat.deliver)
    persist_resumes.start()
    try:
        retry = intake.accept(alice, "conn-2", chat.request("c-3", bob, "queued"))
    finally:
        persist_resumes.join()

    assert len(chat.published) == 1  # no second copy went out
    assert retry.msg_id == first.msg_id  # the client is told the id that was kept
    assert [m["msg_id"] for m in _history(storage, bob, first.conversation_id)] == [str(first.msg_id)]


def test_a_send_is_refused_for_a_retry_when_redis_is_down(chat, make_user, storage):
    alice, bob = make_user(), make_user()
    down = Storage(dataclasses.replace(storage.settings, redis_url="redis://127.0.0.1:1/0"))
    try:
        intake = MessageIntake(down, chat.ids, chat._publish)
        with pytest.raises(Unavailable, match="retry with the same client_msg_id"):
            intake.accept(alice, "conn-1", chat.request("c-4", bob, "lost?"))
    finally:
        down.dispose()
    assert chat.published == []


def test_a_claim_made_before_redis_lost_its_memory_is_not_published_after_it(chat, make_user, storage, clock):
    """The risk window's grace counts on it: no gateway publishes a claim from before the loss later
    than KNOWN_FOR_MS after it last saw the old memory (app/chat/recovery.py)."""
    alice, bob = make_user(), make_user()

    def publish_after_a_loss(payloads, deadline=None, may_start=None):
        flush_redis_keeping_claim(storage.redis)  # Redis forgets between the claim and the publish...
        clock.advance(0.3)  # ...and the gateway's last look at its memory is no longer fresh
        chat._publish(payloads, deadline, may_start)

    intake = MessageIntake(storage, chat.ids, publish_after_a_loss, clock=clock)
    with pytest.raises(Unavailable):
        intake.accept(alice, "conn-1", chat.request("c-lost", bob, "claimed in the old memory"))
    assert chat.published == []
    # Its retry is a claim in the new memory, and is published.
    intake = MessageIntake(storage, chat.ids, chat._publish, clock=clock)
    storage.redis.set("dedupe:since", int((clock() - storage.settings.dedupe_ttl_seconds - 3600) * 1000))
    ack = intake.accept(alice, "conn-2", chat.request("c-lost", bob, "claimed in the old memory"))
    assert [p["msg_id"] for p in chat.published] == [str(ack.msg_id)]
