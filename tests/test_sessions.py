"""Sessions end to end, against real gateways: refresh rotation and theft detection, logout and
logout-all (REST and sockets on every gateway), revocation surviving a Redis flush, one-time
socket tickets, password change, the per-username login lockout."""
import hashlib
import time

import jwt
import pytest
import requests
import websocket

from tests.harness import TEST_JWT_SECRET, ChatClient, User, flush_redis_keeping_claim, register_and_login, wait_until
from tests.test_accounts import close_code


def call(cluster, token, method, path, gateway=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{(gateway or cluster.gw1).http}{path}", headers=headers, timeout=20, **kwargs)


def login(cluster, user, password=None, gateway=None):
    return requests.post(f"{(gateway or cluster.gw1).http}/api/auth/login", timeout=20,
                         json={"username": user.username, "password": password or user.password})


def second_session(cluster, user) -> User:
    """The same account signed in again (another device)."""
    r = login(cluster, user)
    assert r.status_code == 200, r.text
    return User(user.user_id, user.username, r.json()["access_token"], r.json()["refresh_token"], user.password)


def refresh(cluster, refresh_token, gateway=None):
    return requests.post(f"{(gateway or cluster.gw1).http}/api/auth/refresh", json={"refresh_token": refresh_token},
                         timeout=20)


def works(cluster, token, gateway=None) -> bool:
    status = call(cluster, token, "GET", "/api/conversations", gateway).status_code
    assert status in (200, 401), status
    return status == 200


def closed_within(client, seconds: float) -> int:
    """The close code the server sends, which must arrive within `seconds`."""
    start = time.monotonic()
    code = close_code(client, timeout=seconds + 1)
    assert time.monotonic() - start < seconds, f"closed after {time.monotonic() - start:.2f}s"
    return code


def still_open(client) -> bool:
    client.send_json({"type": "ping"})
    return client.next_frame(lambda f: f["type"] == "pong", timeout=5) is not None


def ticket_key(ticket: str) -> str:
    return "wsticket:" + hashlib.sha256(ticket.encode()).hexdigest()


# --- login and refresh ----------------------------------------------------------------------

def test_login_answers_a_short_access_token_of_a_session_and_a_refresh_token_that_rotates(cluster, make_user):
    user = make_user()
    r = login(cluster, user)
    body = r.json()
    assert r.status_code == 200 and set(body) >= {"access_token", "refresh_token", "expires_in", "user_id"}
    claims = jwt.decode(body["access_token"], TEST_JWT_SECRET, algorithms=["HS256"])
    assert body["expires_in"] == 900 and claims["exp"] - claims["iat"] == 900 and claims["sid"]
    assert body["refresh_token"] != body["access_token"] and len(body["refresh_token"]) >= 40

    r = refresh(cluster, body["refresh_token"], cluster.gw2)
    again = r.json()
    assert r.status_code == 200 and again["user_id"] == user.user_id and again["expires_in"] == 900
    assert again["refresh_token"] != body["refresh_token"]
    assert jwt.decode(again["access_token"], TEST_JWT_SECRET, algorithms=["HS256"])["sid"] == claims["sid"]
    assert works(cluster, again["access_token"]) and works(cluster, body["access_token"])  # same session
    assert refresh(cluster, again["refresh_token"]).status_code == 200  # the new one rotates in turn


@pytest.mark.parametrize("body", [{}, {"refresh_token": 5}, {"refresh_token": "x" * 43, "extra": 1}])
def test_a_malformed_refresh_body_is_400(cluster, body):
    r = requests.post(f"{cluster.gw1.http}/api/auth/refresh", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_an_unknown_refresh_token_is_401(cluster):
    r = refresh(cluster, "not-a-token-we-ever-issued-0123456789abcdef")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_a_stolen_refresh_token_used_after_its_owner_refreshed_ends_the_whole_session(cluster, make_user, connect):
    owner = make_user()
    stolen = owner.refresh_token  # copied by the thief
    r = refresh(cluster, owner.refresh_token)
    assert r.status_code == 200
    owner_access, owner_refresh = r.json()["access_token"], r.json()["refresh_token"]
    socket = ChatClient(cluster.gw2.ws, owner_access)
    other_device = second_session(cluster, owner)  # another session of the same account

    r = refresh(cluster, stolen, cluster.gw2)  # the rotated token, presented again
    assert r.status_code == 401 and "already used" in r.json()["message"]
    assert closed_within(socket, 1.0) == 4401  # the owner's socket of that session, on the other gateway
    assert not works(cluster, owner_access) and not works(cluster, owner.token)
    assert refresh(cluster, owner_refresh).status_code == 401  # the whole family, the newest token too
    assert works(cluster, other_device.token) and refresh(cluster, other_device.refresh_token).status_code == 200
    socket.close()


# --- logout ---------------------------------------------------------------------------------

def test_logout_ends_this_session_at_once_and_closes_its_socket_on_the_other_gateway(cluster, make_user, connect):
    user = make_user()
    phone = second_session(cluster, user)
    laptop_socket, phone_socket = connect(user, cluster.gw2), connect(phone, cluster.gw2)
    laptop_on_gw1 = connect(user, cluster.gw1)
    assert works(cluster, user.token)  # cached as open in Redis now

    r = call(cluster, user.token, "POST", "/api/auth/logout")
    assert r.status_code == 204
    assert closed_within(laptop_socket, 1.0) == 4401 and closed_within(laptop_on_gw1, 1.0) == 4401
    r = call(cluster, user.token, "GET", "/api/conversations", cluster.gw2)
    assert r.status_code == 401 and "session was ended" in r.json()["message"]
    assert refresh(cluster, user.refresh_token).status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ChatClient(cluster.gw1.ws, user.token)
    assert refused.value.status_code == 401
    assert still_open(phone_socket) and works(cluster, phone.token)  # the other session is untouched


def test_logout_all_ends_every_session_of_the_user(cluster, make_user, connect):
    user, bystander = make_user(), make_user()
    phone = second_session(cluster, user)
    sockets = [connect(user, cluster.gw1), connect(phone, cluster.gw2)]
    theirs = connect(bystander, cluster.gw2)

    assert call(cluster, phone.token, "POST", "/api/auth/logout-all", cluster.gw2).status_code == 204
    assert [closed_within(s, 1.0) for s in sockets] == [4401, 4401]
    assert not works(cluster, user.token) and not works(cluster, phone.token)
    assert refresh(cluster, user.refresh_token).status_code == 401
    assert refresh(cluster, phone.refresh_token).status_code == 401
    assert still_open(theirs) and works(cluster, bystander.token)
    assert login(cluster, user).status_code == 200  # the password still signs in


def test_logout_needs_a_token(cluster):
    assert call(cluster, None, "POST", "/api/auth/logout").status_code == 401
    assert call(cluster, None, "POST", "/api/auth/logout-all").status_code == 401


def test_a_revoked_session_stays_refused_after_redis_lost_everything(cluster, storage, make_user):
    user, keeper = make_user(), make_user()
    assert works(cluster, user.token) and works(cluster, keeper.token)  # both cached "ok"
    assert call(cluster, user.token, "POST", "/api/auth/logout").status_code == 204
    flush_redis_keeping_claim(storage.redis)  # the cache and its "revoked" entry are gone
    assert not works(cluster, user.token) and not works(cluster, user.token, cluster.gw2)  # MySQL says so
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ChatClient(cluster.gw2.ws, user.token)
    assert refused.value.status_code == 401
    assert works(cluster, keeper.token)  # an open session is still open


def test_a_socket_of_a_session_revoked_while_redis_was_empty_is_closed_by_the_gateways_recheck(
        cluster, storage, make_user, connect):
    """No delivery channel close reaches a socket Redis forgot: the periodic re-check (MySQL) closes it."""
    from app.accounts.sessions import PASSWORD_CHANGED
    from sqlalchemy import update

    from models import AuthSession

    user = make_user()
    client = connect(user, cluster.gw1)
    sid = jwt.decode(user.token, TEST_JWT_SECRET, algorithms=["HS256"])["sid"]
    with storage.session() as session:  # as if the close envelope had been lost
        session.execute(update(AuthSession).where(AuthSession.id == sid)
                        .values(revoked_at_ms=int(time.time() * 1000), revoked_reason=PASSWORD_CHANGED))
    assert close_code(client, timeout=45) == 4401  # ACCOUNT_CHECK_SECONDS (30) and a margin


# --- socket tickets -------------------------------------------------------------------------

def test_a_ticket_opens_one_socket_once(cluster, make_user):
    user = make_user()
    r = call(cluster, user.token, "POST", "/api/ws-ticket")
    assert r.status_code == 201 and r.json()["expires_in"] == 30 and len(r.json()["ticket"]) >= 40
    ticket = r.json()["ticket"]
    client = ChatClient(cluster.gw2.ws, "", ticket=ticket)
    assert client.hello["user_id"] == user.user_id
    with pytest.raises(websocket.WebSocketBadStatusException) as reused:
        websocket.create_connection(f"{cluster.gw1.ws}?ticket={ticket}", timeout=5)
    assert reused.value.status_code == 401
    r = requests.get(f"{cluster.gw2.http}/ws?ticket={ticket}", headers={"Connection": "Upgrade",
                                                                        "Upgrade": "websocket"}, timeout=10)
    assert r.status_code == 401 and "already used" in r.json()["message"]
    assert still_open(client)
    client.close()


def test_an_expired_ticket_is_refused(cluster, storage, make_user):
    user = make_user()
    ticket = call(cluster, user.token, "POST", "/api/ws-ticket").json()["ticket"]
    assert 0 < storage.redis.ttl(ticket_key(ticket)) <= 30  # Redis forgets it after 30 s …
    storage.redis.pexpire(ticket_key(ticket), 1)  # … which we do not sit out
    wait_until(lambda: not storage.redis.exists(ticket_key(ticket)), what="the ticket to expire")
    with pytest.raises(websocket.WebSocketBadStatusException) as expired:
        websocket.create_connection(f"{cluster.gw1.ws}?ticket={ticket}", timeout=5)
    assert expired.value.status_code == 401


def test_a_ticket_socket_belongs_to_the_session_that_asked_for_it(cluster, make_user):
    user = make_user()
    ticket = call(cluster, user.token, "POST", "/api/ws-ticket").json()["ticket"]
    assert call(cluster, user.token, "POST", "/api/auth/logout").status_code == 204
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:  # asked before, used after the logout
        websocket.create_connection(f"{cluster.gw1.ws}?ticket={ticket}", timeout=5)
    assert refused.value.status_code == 401

    user = User(user.user_id, user.username, *(lambda b: (b["access_token"], b["refresh_token"]))(
        login(cluster, user).json()), user.password)
    ticket = call(cluster, user.token, "POST", "/api/ws-ticket").json()["ticket"]
    client = ChatClient(cluster.gw2.ws, "", ticket=ticket)
    assert call(cluster, user.token, "POST", "/api/auth/logout").status_code == 204
    assert closed_within(client, 1.0) == 4401
    client.close()


def test_a_ticket_needs_a_token_and_a_bad_ticket_is_401(cluster):
    assert call(cluster, None, "POST", "/api/ws-ticket").status_code == 401
    for bad in ("", "short", "x" * 43):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"{cluster.gw1.ws}?ticket={bad}", timeout=5)
        assert refused.value.status_code == 401


# --- password change ------------------------------------------------------------------------

def test_a_password_change_keeps_this_session_and_ends_the_others(cluster, make_user, connect):
    user = make_user()
    phone = second_session(cluster, user)
    here, there = connect(user, cluster.gw1), connect(phone, cluster.gw2)

    r = call(cluster, user.token, "PUT", "/api/account/password",
             json={"old_password": user.password, "new_password": "a-new-long-password"})
    assert r.status_code == 204
    assert closed_within(there, 1.0) == 4401
    assert not works(cluster, phone.token) and refresh(cluster, phone.refresh_token).status_code == 401
    assert still_open(here) and works(cluster, user.token) and refresh(cluster, user.refresh_token).status_code == 200
    assert login(cluster, user).status_code == 401
    assert login(cluster, user, "a-new-long-password").status_code == 200


def test_a_password_change_with_a_wrong_old_password_or_a_weak_new_one_is_refused(cluster, make_user):
    user = make_user()
    r = call(cluster, user.token, "PUT", "/api/account/password",
             json={"old_password": "not-my-password", "new_password": "a-new-long-password"})
    assert r.status_code == 403 and "wrong current password" in r.json()["message"]
    r = call(cluster, user.token, "PUT", "/api/account/password",
             json={"old_password": user.password, "new_password": "short"})
    assert r.status_code == 400 and "password must be" in r.json()["message"]
    r = call(cluster, user.token, "PUT", "/api/account/password", json={"new_password": "a-new-long-password"})
    assert r.status_code == 400
    assert call(cluster, None, "PUT", "/api/account/password", json={}).status_code == 401
    assert login(cluster, user).status_code == 200  # unchanged


# --- lockout --------------------------------------------------------------------------------

def test_repeated_failed_logins_lock_the_username_with_a_growing_delay_and_a_success_resets_it(cluster, make_user):
    user = make_user()
    for _ in range(5):
        assert login(cluster, user, "wrong-password").status_code == 401
    r = login(cluster, user)  # even the right password waits: no guess is tried while locked
    assert r.status_code == 429 and r.json()["error"] == "rate_limited" and r.headers["Retry-After"] == "1"
    assert "failed logins" in r.json()["message"]
    r = login(cluster, user, "wrong-password", cluster.gw2)  # the lock is per name, on every gateway
    assert r.status_code == 429

    wait_until(lambda: login(cluster, user, "wrong-password").status_code == 401, timeout=5,
               what="the first lock (1 s) to pass")
    r = login(cluster, user)  # the 6th failure locked it for 2 s
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    wait_until(lambda: login(cluster, user).status_code == 200, timeout=6, what="the second lock (2 s) to pass")
    for _ in range(4):  # the count started again
        assert login(cluster, user, "wrong-password").status_code == 401
    assert login(cluster, user).status_code == 200
    bystander = register_and_login(cluster.gw1.http)
    assert login(cluster, bystander).status_code == 200
