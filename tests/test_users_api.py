"""GET /api/users?username=: the lookup behind "start a chat with <username>"; and the chat page shell."""
import requests


def _lookup(gateway, user, **params):
    headers = {"Authorization": f"Bearer {user.token}"} if user is not None else {}
    return requests.get(f"{gateway.http}/api/users", headers=headers, params=params, timeout=10)


def _assert_json_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["error"] == code and body["message"], body


def test_a_username_resolves_to_its_user_id_as_a_string(cluster, make_user):
    alice, bob = make_user(), make_user()
    r = _lookup(cluster.gw2, alice, username=bob.username)
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": bob.user_id, "username": bob.username}
    assert isinstance(r.json()["user_id"], str)
    # Any user may look up any user, themselves included.
    assert _lookup(cluster.gw1, bob, username=bob.username).json()["user_id"] == bob.user_id


def test_an_unknown_username_is_404_and_a_missing_or_malformed_one_400(cluster, make_user):
    alice = make_user()
    _assert_json_error(_lookup(cluster.gw1, alice, username="nobody-" + alice.username[:10]), 404, "not_found")
    _assert_json_error(_lookup(cluster.gw1, alice), 400, "invalid_request")
    _assert_json_error(_lookup(cluster.gw1, alice, username=""), 400, "invalid_request")
    _assert_json_error(_lookup(cluster.gw1, alice, username="a b<c>"), 400, "invalid_request")
    _assert_json_error(_lookup(cluster.gw1, alice, username="x" * 33), 400, "invalid_request")


def test_the_lookup_needs_a_bearer_token(cluster, make_user):
    bob = make_user()
    _assert_json_error(_lookup(cluster.gw1, None, username=bob.username), 401, "unauthorized")
    r = requests.get(f"{cluster.gw1.http}/api/users", params={"username": bob.username, "token": bob.token},
                     timeout=10)
    _assert_json_error(r, 401, "unauthorized")  # ?token= is for /ws only


def test_the_chat_page_and_client_module_are_served_with_a_strict_policy(cluster):
    page = requests.get(f"{cluster.gw1.http}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
    assert '<script type="module" src="/static/chat.js">' in page.text
    module = requests.get(f"{cluster.gw1.http}/static/netherlink.js", timeout=10)
    assert module.status_code == 200 and "javascript" in module.headers["Content-Type"]
    assert "export class NetherLinkClient" in module.text
    for path in ("/static/netherlink.css", "/static/chat.css"):
        assert requests.get(f"{cluster.gw1.http}{path}", timeout=10).status_code == 200


def test_a_user_id_resolves_to_its_name_for_any_signed_in_user(cluster, make_user):
    alice, bob = make_user(), make_user()
    headers = {"Authorization": f"Bearer {alice.token}"}
    r = requests.get(f"{cluster.gw1.http}/api/users/{bob.user_id}", headers=headers, timeout=10)
    assert r.status_code == 200 and r.json() == {"user_id": bob.user_id, "username": bob.username}
    _assert_json_error(requests.get(f"{cluster.gw1.http}/api/users/999999999999", headers=headers, timeout=10),
                       404, "not_found")
    _assert_json_error(requests.get(f"{cluster.gw1.http}/api/users/{bob.user_id}", timeout=10), 401, "unauthorized")
