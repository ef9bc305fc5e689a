"""Devices and push settings over REST."""
from datetime import datetime, timezone

import pytest
import requests

from app.push.settings import PushPreferences


def _api(cluster, user, method, path, **kwargs):
    return requests.request(method, f"{cluster.gw1.http}/api{path}",
                            headers={"Authorization": f"Bearer {user.token}"}, timeout=10, **kwargs)


def test_a_device_token_is_registered_listed_moved_to_a_new_owner_and_removed(cluster, make_user):
    alice, bob = make_user(), make_user()
    token = f"apns-{alice.user_id}-0123456789abcdef"
    r = _api(cluster, alice, "POST", "/devices", json={"platform": "ios", "token": token})
    assert r.status_code == 201 and r.json()["platform"] == "ios"
    assert [d["token"] for d in _api(cluster, alice, "GET", "/devices").json()["devices"]] == [token]
    # Bob logs in on the same phone: the token follows him.
    r = _api(cluster, bob, "POST", "/devices", json={"platform": "ios", "token": token})
    assert r.status_code == 201
    assert _api(cluster, alice, "GET", "/devices").json()["devices"] == []
    assert [d["token"] for d in _api(cluster, bob, "GET", "/devices").json()["devices"]] == [token]
    # Only the owner can remove it; unknown and foreign tokens look the same.
    assert _api(cluster, alice, "DELETE", f"/devices/{token}").status_code == 404
    assert _api(cluster, bob, "DELETE", f"/devices/{token}").status_code == 204
    assert _api(cluster, bob, "DELETE", f"/devices/{token}").status_code == 404
    assert _api(cluster, bob, "GET", "/devices").json()["devices"] == []


@pytest.mark.parametrize("body", [{"platform": "blackberry", "token": "t"}, {"platform": "ios"},
                                  {"platform": "ios", "token": "has space"}, {"platform": "ios", "token": 5}])
def test_bad_device_registrations_are_400(cluster, make_user, body):
    r = _api(cluster, make_user(), "POST", "/devices", json=body)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request" and r.json()["message"]


def test_push_settings_start_with_defaults_and_keep_what_is_not_changed(cluster, make_user):
    user = make_user()
    assert _api(cluster, user, "GET", "/push-settings").json() == {
        "channels": ["apns", "fcm", "email", "webpush"], "email": None, "email_verified": False,
        "muted_conversations": [],
        "do_not_disturb": None, "time_zone": "UTC", "preview": True}
    r = _api(cluster, user, "PUT", "/push-settings", json={
        "email": "me@example.org", "do_not_disturb": {"start": "22:00", "end": "07:00"},
        "time_zone": "Europe/Berlin", "muted_conversations": ["p_1_2", "p_1_2"]})
    assert r.status_code == 200
    r = _api(cluster, user, "PUT", "/push-settings", json={"preview": False, "channels": ["email", "apns"]})
    assert r.json() == _api(cluster, user, "GET", "/push-settings").json() == {
        "channels": ["apns", "email"], "email": "me@example.org", "email_verified": False,
        "muted_conversations": ["p_1_2"],
        "do_not_disturb": {"start": "22:00", "end": "07:00"}, "time_zone": "Europe/Berlin", "preview": False}
    r = _api(cluster, user, "PUT", "/push-settings", json={"do_not_disturb": None, "email": None})
    assert r.json()["do_not_disturb"] is None and r.json()["email"] is None


@pytest.mark.parametrize("body, field", [
    ({"channels": ["sms"]}, "channels"), ({"channels": "apns"}, "channels"), ({"email": "not-an-email"}, "email"),
    ({"do_not_disturb": {"start": "25:00", "end": "07:00"}}, "do_not_disturb"),
    ({"do_not_disturb": {"start": "07:00", "end": "07:00"}}, "do_not_disturb"),
    ({"time_zone": "Mars/Olympus"}, "time_zone"), ({"preview": "yes"}, "preview"),
    ({"muted_conversations": [1]}, "muted_conversations"), ({"volume": 11}, "volume"),
])
def test_bad_push_settings_are_400_naming_the_field_and_change_nothing(cluster, make_user, body, field):
    user = make_user()
    before = _api(cluster, user, "GET", "/push-settings").json()
    r = _api(cluster, user, "PUT", "/push-settings", json=body)
    assert r.status_code == 400 and field in r.json()["message"]
    assert _api(cluster, user, "GET", "/push-settings").json() == before


def test_push_endpoints_need_a_token(cluster):
    for method, path in [("GET", "/devices"), ("POST", "/devices"), ("GET", "/push-settings")]:
        r = requests.request(method, f"{cluster.gw1.http}/api{path}", timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"


@pytest.mark.parametrize("start, end, utc_time, quiet", [
    ("22:00", "07:00", "2026-06-01T21:30:00", True),   # 23:30 in Berlin (UTC+2 in June)
    ("22:00", "07:00", "2026-06-01T05:30:00", False),  # 07:30 in Berlin
    ("09:00", "17:00", "2026-01-15T12:00:00", True),   # 13:00 in Berlin (UTC+1 in January)
    ("09:00", "17:00", "2026-01-15T16:30:00", False),  # 17:30 in Berlin
])
def test_do_not_disturb_hours_are_in_the_users_time_zone(start, end, utc_time, quiet):
    prefs = PushPreferences(dnd_start=start, dnd_end=end, time_zone="Europe/Berlin")
    at = datetime.fromisoformat(utc_time).replace(tzinfo=timezone.utc)
    assert prefs.is_quiet(at) is quiet
