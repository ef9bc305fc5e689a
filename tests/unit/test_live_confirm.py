"""app.chat.confirm: live deliveries a device must confirm, settled at their deadline."""
from sqlalchemy import select

from app.chat.confirm import PENDING_KEY, SWEEP_KEY, await_confirmation, rearm_sweep, settle_due
from app.chat.receipts import mark_read, mark_received
from app.chat.recall import recall_message
from app.chat.presence import Presence
from models import OfflineMessageIndex


def _indexed(storage, user_id):
    with storage.sessions() as session:
        return sorted(session.scalars(select(OfflineMessageIndex.message_id).where(
            OfflineMessageIndex.user_id == user_id)))


def test_dispatch_names_live_recipients_and_the_sweep_keeps_only_the_unconfirmed(chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    Presence(storage.redis).connect(bob, "bob-phone", "gw-a", 0)
    acks = [chat.send(alice, bob, f"m{i}") for i in range(4)]
    outcomes = chat.deliver()
    assert [outcomes[a.msg_id][1].live_users for a in acks] == [[bob]] * 4  # the sender is not asked
    cid, now = acks[0].conversation_id, clock.ms()
    assert await_confirmation(storage, [(bob, a.msg_id, cid, 8) for a in acks], now) is True
    assert await_confirmation(storage, [(bob, acks[0].msg_id, cid, 8)], now) is False  # a sweep is queued already
    mark_received(storage, bob, cid, acks[1].msg_id)  # a device holds 0 and 1
    recall_message(storage, alice, acks[3].msg_id, now_ms=now)  # nothing to push for a recalled one
    window = int(storage.settings.live_confirm_seconds * 1000)
    early = settle_due(storage, now + window - 1)
    assert early.unconfirmed == [] and early.confirmed == 0 and early.next_due_ms == now + window
    due = settle_due(storage, now + window)
    assert due.unconfirmed == [(bob, acks[2].msg_id, 8)] and due.confirmed == 3
    assert _indexed(storage, bob) == [acks[2].msg_id]
    assert storage.redis.zcard(PENDING_KEY) == 0 and due.next_due_ms is None
    assert rearm_sweep(storage, due, now + window) is None and not storage.redis.exists(SWEEP_KEY)
    again = settle_due(storage, now + window)  # a redelivered sweep finds nothing left
    assert again.unconfirmed == [] and _indexed(storage, bob) == [acks[2].msg_id]


def test_a_read_on_another_device_confirms_and_the_sweep_rearms_for_what_still_waits(
        chat, make_user, storage, clock):
    alice, bob = make_user(), make_user()
    first = chat.send(alice, bob, "first")
    chat.deliver()
    now = clock.ms()
    await_confirmation(storage, [(bob, first.msg_id, first.conversation_id, 8)], now)
    later = chat.send(alice, bob, "later")
    chat.deliver()
    await_confirmation(storage, [(bob, later.msg_id, later.conversation_id, 8)], now + 5000)
    mark_read(storage, bob, first.conversation_id, first.msg_id)
    window = int(storage.settings.live_confirm_seconds * 1000)
    due = settle_due(storage, now + window)
    assert due.unconfirmed == [] and due.confirmed == 1 and due.next_due_ms == now + 5000 + window
    assert rearm_sweep(storage, due, now + window) == 5.0  # the next sweep when the later one falls due
    assert storage.redis.exists(SWEEP_KEY)


def test_off_when_the_window_is_zero(make_user, storage):
    from dataclasses import replace

    class Off:
        settings = replace(storage.settings, live_confirm_seconds=0)
        redis = storage.redis

    assert await_confirmation(Off, [(1, 2, "p_1_3", 8)], 0) is False and storage.redis.zcard(PENDING_KEY) == 0
