"""Rate limits: sends per user, frames per connection, connections per user,
connection attempts per address, login attempts. Each limit is on only in the
gateway that tests it (the shared gateways run without limits)."""
import json
import time
import uuid

import pytest
import requests
import websocket

from tests.harness import ChatClient, Gateway, register_and_login, wait_until


@pytest.fixture(scope="module")
def limited(services, log_dir, cluster):
    gw = Gateway("gwlimits", services, log_dir, SEND_RATE_PER_SECOND="2",
                 SEND_BURST="3", FRAME_RATE_PER_SECOND="20", FRAME_BURST="20", FLOOD_CLOSE_AFTER="25",
                 MAX_CONNECTIONS_PER_USER="2")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def guarded(services, log_dir, cluster):
    gw = Gateway("gwguard", services, log_dir, CONNECT_RATE_PER_MINUTE="6", CONNECT_BURST="4",
                 LOGIN_RATE_PER_MINUTE="6", LOGIN_BURST="3", REGISTER_RATE_PER_MINUTE="6", REGISTER_BURST="3")
    yield gw
    gw.stop()


def test_sends_over_the_limit_are_refused_with_a_hint_and_go_through_on_retry(limited, make_user, connect,
                                                                             out_of_risk_window):
    # (out of the risk window: inside it each ack waits for storage, and the burst would refill meanwhile)
    alice, bob, carol = make_user(), make_user(), make_user()
    a, b, c = connect(alice, limited), connect(bob, limited), connect(carol, limited)
    acks = [a.send_message(bob.user_id, f"burst {i}") for i in range(3)]
    assert [x["type"] for x in acks] == ["ack"] * 3
    refused = a.send_message(bob.user_id, "one too many", client_msg_id="over-1")
    assert (refused["type"], refused["code"], refused["client_msg_id"]) == ("error", "rate_limited", "over-1")
    assert 0 < refused["retry_after_ms"] <= 1000 and "retry in" in refused["message"]
    # Another user is not held back by Alice's limit.
    assert c.send_message(bob.user_id, "unaffected")["type"] == "ack"
    time.sleep(refused["retry_after_ms"] / 1000)  # the server's own hint is what a client waits
    retried = a.send_message(bob.user_id, "one too many", client_msg_id="over-1")
    assert retried["type"] == "ack"
    for ack in [*acks, retried]:
        b.wait_message(ack["msg_id"])
    b.drain(quiet=0.3)
    assert len([m for m in b.messages() if m["client_msg_id"] == "over-1"]) == 1  # stored once


def test_a_flooding_connection_is_told_then_closed_and_others_are_not(limited, make_user, connect):
    flooder, neighbour = make_user(), make_user()
    f, n = connect(flooder, limited), connect(neighbour, limited)
    for _ in range(100):
        try:
            f.send_json({"type": "ping"})
        except (websocket.WebSocketConnectionClosedException, BrokenPipeError, ConnectionResetError):
            break
    codes, close_code = [], None
    f.ws.settimeout(5)
    while close_code is None:
        opcode, data = f.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close_code = int.from_bytes(data[:2], "big")
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            frame = json.loads(data)
            codes.append(frame.get("code") or frame["type"])
    assert codes.count("pong") == 20 and "rate_limited" in codes  # the burst, then refusals
    assert close_code == 1008
    # A refused send names its client_msg_id, so the client knows which one to resend.
    n2 = connect(neighbour, limited)
    for i in range(25):
        n2.send_json({"type": "send", "client_msg_id": f"burst-{i}", "to": flooder.user_id, "content": "x"})
    refused = n2.next_frame(lambda fr: fr.get("code") == "rate_limited" and "frames" in fr["message"])
    assert refused["client_msg_id"].startswith("burst-")
    n.send_json({"type": "ping"})
    assert n.next_frame(lambda fr: fr["type"] == "pong")


def test_an_account_may_hold_only_so_many_connections(limited, make_user):
    user = make_user()
    first, second = ChatClient(limited.ws, user.token), ChatClient(limited.ws, user.token)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ChatClient(limited.ws, user.token)
    assert refused.value.status_code == 429
    body = json.loads(refused.value.resp_body)
    assert body["error"] == "rate_limited" and "at most 2" in body["message"]
    first.close()

    def third_connects():
        try:
            ChatClient(limited.ws, user.token).close()
            return True
        except websocket.WebSocketBadStatusException:
            return False

    wait_until(third_connects, what="a free connection slot after a close")
    second.close()


def test_connection_attempts_per_address_are_limited_even_with_bad_tokens(guarded):
    statuses = [requests.get(f"{guarded.http}/ws", params={"token": "not-a-token"}, timeout=5) for _ in range(6)]
    assert [r.status_code for r in statuses[:4]] == [401] * 4
    limited = statuses[4]
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1 and limited.json()["retry_after_ms"] > 0


def test_login_attempts_are_limited_per_address_and_account(guarded):
    user = register_and_login(guarded.http)  # one login: 2 of the burst of 3 are left
    wrong = {"username": user.username, "password": "not-the-password"}
    answers = [requests.post(f"{guarded.http}/api/auth/login", json=wrong, timeout=10) for _ in range(2)]
    assert [r.status_code for r in answers] == [401, 401]
    refused = requests.post(f"{guarded.http}/api/auth/login", json={**wrong, "password": "correct-horse"}, timeout=10)
    assert refused.status_code == 429  # even the right password: the limit comes first
    assert refused.json()["error"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    other = requests.post(f"{guarded.http}/api/auth/login",
                          json={"username": f"x{uuid.uuid4().hex[:8]}", "password": "whatever-123"}, timeout=10)
    assert other.status_code == 429  # another account from the same address: the per-address limit holds


def test_malformed_frames_count_against_the_budget_too(limited, make_user, connect):
    client = connect(make_user(), limited)
    for _ in range(60):
        try:
            client.send_json("not json at all")
        except (websocket.WebSocketConnectionClosedException, BrokenPipeError, ConnectionResetError):
            break
    client.ws.settimeout(5)
    while True:
        opcode, data = client.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            assert int.from_bytes(data[:2], "big") == 1008
            break


def test_registrations_and_admin_logins_are_limited_too(guarded):
    def until_refused(request, attempts=5):
        statuses = []
        while len(statuses) < attempts and 429 not in statuses:
            statuses.append(request().status_code)
        return statuses

    statuses = until_refused(lambda: requests.post(
        f"{guarded.http}/api/auth/register",
        json={"username": f"r{uuid.uuid4().hex[:10]}", "password": "correct-horse"}, timeout=10))
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {201}  # a burst of at most 3, then refused
    statuses = until_refused(lambda: requests.post(
        f"{guarded.http}/admin/login", data={"username": "root", "password": "guess"}, timeout=10))
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {401}  # the dashboard shares the login budget
    page = requests.post(f"{guarded.http}/admin/login", data={"username": "root", "password": "guess"}, timeout=10)
    assert page.status_code == 429 and "too many login attempts" in page.text


def test_unsafe_limit_settings_are_refused():
    from app.config import ConfigError, Settings

    for bad in ({"send_burst": 0}, {"flood_close_after": 0}, {"max_connections_per_user": -1},
                {"login_rate_per_minute": -5}):
        with pytest.raises(ConfigError):
            Settings.from_env({}, **bad)
