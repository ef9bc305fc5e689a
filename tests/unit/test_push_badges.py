"""Badge sync planning (app.push.badges): who gets a silent push after reads, and what it withdraws."""
from sqlalchemy import select

from app.chat.receipts import mark_read
from app.push.badges import BADGE_SYNC_KEY, SHOWN_KEY, claim_badge_syncs, plan_badge_syncs, record_delivered
from app.push.settings import register_device, remove_device
from models import PushLog


def _device(storage, user, platform, token):
    with storage.session() as session:
        return register_device(session, user, platform, token).id


def _shown(storage, user, device, ack, badge):
    record_delivered(storage, [(user, device, {"conversation_id": ack.conversation_id, "msg_id": str(ack.msg_id),
                                               "badge": badge})])


def _rows(storage, push_ids):
    with storage.sessions() as session:
        return session.scalars(select(PushLog).where(PushLog.id.in_(push_ids)).order_by(PushLog.id)).all()


def test_only_devices_that_show_a_notification_get_a_sync_withdrawing_what_was_read(storage, chat, make_user):
    alice, carol, bob = make_user(), make_user(), make_user()
    phone, tablet, laptop = (_device(storage, bob, p, f"{p}-{bob}") for p in ("ios", "android", "webpush"))
    first, other = chat.message(alice, bob, "one"), chat.message(carol, bob, "two")
    _shown(storage, bob, phone, first, 2)
    _shown(storage, bob, phone, other, 2)
    _shown(storage, bob, tablet, other, 2)  # the tablet shows only carol's
    assert claim_badge_syncs(storage, [alice, bob]) == [bob]  # alice was never pushed
    assert claim_badge_syncs(storage, [bob]) == []  # one window at a time
    mark_read(storage, bob, first.conversation_id, first.msg_id)

    [plan] = plan_badge_syncs(storage, {bob: first.msg_id})
    assert not storage.redis.exists(BADGE_SYNC_KEY.format(bob))  # the next read opens a new window
    rows = {r.device_id: r for r in _rows(storage, plan.push_ids)}
    assert set(rows) == {phone, tablet}  # not the laptop: it shows nothing
    assert rows[phone].payload["withdraw"] == [[first.conversation_id, str(first.msg_id)]]
    assert rows[tablet].payload["withdraw"] == [] and rows[tablet].payload["badge"] == 1  # its badge was 2
    assert {r.target for r in rows.values()} == {f"badge:{phone}", f"badge:{tablet}"}

    # Accepted: the phone no longer shows alice's message, and an unchanged state plans nothing.
    record_delivered(storage, [(bob, d, r.payload) for d, r in rows.items()])
    assert storage.redis.hgetall(SHOWN_KEY.format(bob)) == {
        f"{phone}:{other.conversation_id}": str(other.msg_id), f"{phone}:#badge": "1",
        f"{tablet}:{other.conversation_id}": str(other.msg_id), f"{tablet}:#badge": "1"}
    [again] = plan_badge_syncs(storage, {bob: first.msg_id + 1})
    assert again.push_ids == [] and again.skipped


def test_a_newer_notification_of_the_conversation_is_not_withdrawn_by_an_older_sync(storage, chat, make_user):
    alice, bob = make_user(), make_user()
    phone = _device(storage, bob, "ios", f"ios-{bob}")
    first = chat.message(alice, bob, "one")
    _shown(storage, bob, phone, first, 1)
    sync = {"kind": "badge_sync", "badge": 0, "withdraw": [[first.conversation_id, str(first.msg_id)]]}
    newer = chat.message(alice, bob, "two")
    _shown(storage, bob, phone, newer, 2)  # replaced it (same collapse id) before the sync was accepted
    record_delivered(storage, [(bob, phone, sync)])
    assert storage.redis.hget(SHOWN_KEY.format(bob), f"{phone}:{newer.conversation_id}") == str(newer.msg_id)


def test_a_device_that_is_gone_is_forgotten(storage, chat, make_user):
    alice, bob = make_user(), make_user()
    phone = _device(storage, bob, "ios", f"ios-{bob}")
    ack = chat.message(alice, bob, "one")
    _shown(storage, bob, phone, ack, 1)
    with storage.session() as session:
        remove_device(session, bob, f"ios-{bob}")
    [plan] = plan_badge_syncs(storage, {bob: ack.msg_id})
    assert plan.push_ids == [] and not storage.redis.exists(SHOWN_KEY.format(bob))
