"""Push devices and preferences (app.push.settings): quiet hours in the user's time zone, tokens."""
from datetime import datetime, timezone

import pytest

from app.errors import NotFound
from app.push.settings import (
    CHANNELS, PushPreferences, list_devices, load_preferences, register_device, remove_device, save_preferences,
)

UTC = timezone.utc


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_quiet_hours_across_midnight_follow_the_users_time_zone_and_its_summer_time():
    prefs = PushPreferences(dnd_start="22:00", dnd_end="07:00", time_zone="Europe/Berlin")
    # Winter: Berlin is UTC+1.
    assert not prefs.is_quiet(_at("2026-01-15 20:59"))
    assert prefs.is_quiet(_at("2026-01-15 21:00"))
    assert prefs.quiet_until(_at("2026-01-15 21:00")) == _at("2026-01-16 06:00")
    assert prefs.quiet_until(_at("2026-01-16 02:30")) == _at("2026-01-16 06:00")
    assert not prefs.is_quiet(_at("2026-01-16 06:00")) and prefs.quiet_until(_at("2026-01-16 06:00")) is None
    # Summer: UTC+2, the same local hours an hour earlier in UTC.
    assert prefs.is_quiet(_at("2026-07-15 20:00"))
    assert prefs.quiet_until(_at("2026-07-15 20:00")) == _at("2026-07-16 05:00")


def test_quiet_hours_within_one_day_and_none_at_all():
    lunch = PushPreferences(dnd_start="12:00", dnd_end="13:30", time_zone="UTC")
    assert [lunch.is_quiet(_at(f"2026-03-02 {t}")) for t in ("11:59", "12:00", "13:29", "13:30")] == [
        False, True, True, False]
    assert lunch.quiet_until(_at("2026-03-02 12:45")) == _at("2026-03-02 13:30")
    assert not PushPreferences().is_quiet(_at("2026-03-02 03:00"))


def test_preferences_are_kept_as_saved_and_default_to_every_channel(make_user, storage):
    alice, bob = make_user(), make_user()
    wanted = PushPreferences(channels=["apns"], email="a@example.org", muted_conversations=["g_1"],
                             dnd_start="23:00", dnd_end="06:30", time_zone="Asia/Tokyo", preview=False)
    with storage.session() as session:
        save_preferences(session, alice, wanted)
    with storage.sessions() as session:
        assert load_preferences(session, [alice])[alice] == wanted
        assert load_preferences(session, [bob])[bob] == PushPreferences() and PushPreferences().channels == list(CHANNELS)
    assert wanted.is_muted("g_1") and not wanted.is_muted("g_2")
    assert wanted.view()["do_not_disturb"] == {"start": "23:00", "end": "06:30"}


def test_a_device_token_moves_to_the_account_that_registers_it_last(make_user, storage):
    alice, bob = make_user(), make_user()
    with storage.session() as session:
        register_device(session, alice, "ios", "token-shared-phone")
        register_device(session, alice, "android", "token-alice-tablet")
    with storage.session() as session:
        register_device(session, bob, "ios", "token-shared-phone")  # Bob logs in on the same phone
    with storage.sessions() as session:
        assert [d.token for d in list_devices(session, alice)] == ["token-alice-tablet"]
        assert [(d.platform, d.token) for d in list_devices(session, bob)] == [("ios", "token-shared-phone")]


def test_one_cannot_remove_someone_elses_device(make_user, storage):
    alice, mallory = make_user(), make_user()
    with storage.session() as session:
        register_device(session, alice, "web", "token-alice")
    with storage.session() as session, pytest.raises(NotFound, match="no such device token"):
        remove_device(session, mallory, "token-alice")
    with storage.session() as session:
        remove_device(session, alice, "token-alice")
    with storage.sessions() as session:
        assert list_devices(session, alice) == []
