"""Disabled and deleted accounts: no login, tokens refused, open sockets cut off."""
import subprocess
import sys

import pytest
import requests
import websocket
from sqlalchemy import delete

from models import User
from tests.harness import ChatClient, Gateway, wait_until


def flask_command(services, *args):
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], env=services.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def close_code(client, timeout=10):
    client.ws.settimeout(timeout)
    while True:
        opcode, data = client.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big")


def test_disabling_an_account_closes_its_sockets_and_refuses_its_tokens(cluster, services, make_user, connect):
    mallory, bob = make_user(), make_user()
    m1, m2 = connect(mallory, cluster.gw1), connect(mallory, cluster.gw2)
    out = flask_command(services, "disable-user", mallory.username)
    assert "is disabled" in out
    assert close_code(m1) == 4401 and close_code(m2) == 4401  # on both gateways, at once
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ChatClient(cluster.gw1.ws, mallory.token)
    assert refused.value.status_code == 401
    headers = {"Authorization": f"Bearer {mallory.token}"}
    r = requests.get(f"{cluster.gw1.http}/api/conversations", headers=headers, timeout=10)
    assert r.status_code == 401 and "disabled" in r.json()["message"]
    r = requests.post(f"{cluster.gw1.http}/api/auth/login",
                      json={"username": mallory.username, "password": "correct-horse"}, timeout=10)
    assert r.status_code == 401 and "disabled" in r.json()["message"]
    # Others are untouched; and the account works again once enabled.
    assert connect(bob).send_message(mallory.user_id, "hello?")["type"] == "ack"
    flask_command(services, "enable-user", mallory.username)
    assert requests.get(f"{cluster.gw1.http}/api/conversations", headers=headers, timeout=10).status_code == 200
    ChatClient(cluster.gw1.ws, mallory.token).close()


def test_a_deleted_account_is_cut_off_within_the_check_interval(services, log_dir, cluster, make_user, storage):
    gw = Gateway("gwaccounts", services, log_dir, ACCOUNT_CHECK_SECONDS="1")
    try:
        gone = make_user()
        client = ChatClient(gw.ws, gone.token)
        with storage.session() as session:
            session.execute(delete(User).where(User.id == int(gone.user_id)))
        assert close_code(client, timeout=15) == 4401
    finally:
        gw.stop()
