"""Registration, login and the tokens the gateway accepts."""
import time

import jwt
import pytest
import requests
import websocket

from tests.harness import TEST_JWT_SECRET, ChatClient, register_and_login


def test_register_then_login_returns_a_working_token(cluster):
    user = register_and_login(cluster.gw1.http)
    claims = jwt.decode(user.token, TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == user.user_id and claims["sid"]
    assert claims["exp"] > claims["iat"] >= int(time.time()) - 5
    client = ChatClient(cluster.gw1.ws, user.token)
    assert client.hello["user_id"] == user.user_id
    client.close()


def test_taken_username_is_409_and_wrong_password_401(cluster):
    user = register_and_login(cluster.gw1.http)
    r = requests.post(f"{cluster.gw1.http}/api/auth/register", json={"username": user.username, "password": "x" * 12})
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    r = requests.post(f"{cluster.gw1.http}/api/auth/login", json={"username": user.username, "password": "wrong-password"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = requests.post(f"{cluster.gw1.http}/api/auth/login", json={"username": "nobody-here", "password": "whatever1"})
    assert r.status_code == 401


@pytest.mark.parametrize("body", [None, "[]", '{"username": "ab", "password": "long-enough"}',
                                  '{"username": "valid_name", "password": "short"}', '{"username": 5, "password": 6}'])
def test_bad_registration_bodies_get_json_400(cluster, body):
    r = requests.post(f"{cluster.gw1.http}/api/auth/register", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request" and r.json()["message"]


def test_unknown_path_and_method_are_json_errors(cluster):
    r = requests.get(f"{cluster.gw1.http}/api/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = requests.get(f"{cluster.gw1.http}/api/auth/login")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def _forged(claims, key=TEST_JWT_SECRET, alg="HS256"):
    return jwt.encode(claims, key, algorithm=alg)


def _none_alg_token(sub):
    import base64
    import json

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': sub, 'iat': now, 'exp': now + 600})}."


@pytest.mark.parametrize("case", ["missing", "malformed", "expired", "wrong_key", "alg_none", "no_exp", "no_such_user",
                                  "no_session", "unknown_session"])
def test_bad_tokens_are_refused_with_401_before_the_upgrade(cluster, case):
    user = register_and_login(cluster.gw1.http)
    now = int(time.time())
    token = {
        "missing": "",
        "malformed": "not-a-jwt",
        "expired": _forged({"sub": user.user_id, "iat": now - 7200, "exp": now - 3600}),
        "wrong_key": _forged({"sub": user.user_id, "iat": now, "exp": now + 600}, key="another-secret-0123456789abcdef"),
        "alg_none": _none_alg_token(user.user_id),
        "no_exp": _forged({"sub": user.user_id, "iat": now}),
        "no_such_user": _forged({"sub": "987654321987", "sid": "0" * 32, "iat": now, "exp": now + 600}),
        # Issued before sessions (no sid: it could never be revoked), or naming a session never opened.
        "no_session": _forged({"sub": user.user_id, "iat": now, "exp": now + 600}),
        "unknown_session": _forged({"sub": user.user_id, "sid": "f" * 32, "iat": now, "exp": now + 600}),
    }[case]
    url = cluster.gw1.ws + (f"?token={token}" if token else "")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=5)
    assert refused.value.status_code == 401
    # Plain HTTP shows the same refusal as a JSON error body.
    r = requests.get(url.replace("ws://", "http://"), headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_token_in_authorization_header_is_accepted(cluster):
    user = register_and_login(cluster.gw1.http)
    client = ChatClient(cluster.gw2.ws, user.token, use_header=True)
    assert client.hello["user_id"] == user.user_id and client.hello["gateway_id"] == "gw2"
    assert client.hello["heartbeat_interval"] == 30 and client.hello["conn_id"]
    client.send_json({"type": "ping"})
    client.next_frame(lambda f: f["type"] == "pong")
    client.close()


def test_a_socket_is_closed_with_4401_when_its_token_expires(cluster):
    user = register_and_login(cluster.gw1.http)
    now = int(time.time())
    sid = jwt.decode(user.token, TEST_JWT_SECRET, algorithms=["HS256"])["sid"]  # the login's session
    client = ChatClient(cluster.gw1.ws, _forged({"sub": user.user_id, "sid": sid, "iat": now, "exp": now + 2}))
    client.ws.settimeout(10)
    opcode, data = client.ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4401
    assert b"token expired" in data[2:]


def test_a_small_clock_skew_is_tolerated_and_no_more():
    from app.accounts.auth import JWT_LEEWAY_SECONDS, issue_token, verify_token
    from app.config import Settings
    from app.errors import Unauthorized

    settings = Settings.from_env({}, jwt_ttl_seconds=60)
    now = time.time()
    just_expired = issue_token(settings, 7, "s1", now=now - 60 - JWT_LEEWAY_SECONDS // 2)  # exp a few seconds ago
    assert verify_token(settings, just_expired).user_id == 7
    long_expired = issue_token(settings, 7, "s1", now=now - 60 - JWT_LEEWAY_SECONDS * 3)
    with pytest.raises(Unauthorized):
        verify_token(settings, long_expired)
