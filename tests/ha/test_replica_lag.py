"""A MariaDB replica that stops applying the primary's changes for 20 s while users
send, sync and read history (DATABASE_REPLICA_URL is the real GTID replica of
scripts/cluster.py): a client syncing from its cursor the whole time never gets an
entry twice and never skips one, and once the replica catches up its stream is
every acked message, in order."""
from __future__ import annotations

import json
import threading
import time

import requests
import websocket

from scripts import cluster
from tests.faults.load import sync_all
from tests.faults.test_faults import REPORT
from tests.harness import register_and_login, wait_until

LAG_SECONDS = 20.0


class IncrementalSync:
    """A client that keeps syncing from its last cursor, as one does after each reconnect."""

    def __init__(self, gateway, token: str):
        self.ws = websocket.create_connection(f"{gateway.ws}?token={token}", timeout=10)
        json.loads(self.ws.recv())
        self.cursor, self.msg_ids, self.pages = None, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def page(self) -> None:
        self.ws.send(json.dumps({"type": "sync", "cursor": self.cursor, "limit": 50}))
        while True:
            frame = json.loads(self.ws.recv())
            if frame["type"] == "sync_batch":
                break
        self.msg_ids += [e["msg_id"] for e in frame["messages"] if e["type"] == "message"]
        self.cursor = frame["cursor"]
        self.pages += 1

    def _run(self) -> None:
        while not self.stop.is_set():
            self.page()
            self.stop.wait(0.2)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _history(gateway, user, conversation_id: str) -> list[str]:
    r = requests.get(f"{gateway.http}/api/conversations/{conversation_id}/messages",
                     headers={"Authorization": f"Bearer {user.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return [m["msg_id"] for m in r.json()["messages"]]


def _send(gateway, user, to: str, count: int, prefix: str) -> list[dict]:
    ws = websocket.create_connection(f"{gateway.ws}?token={user.token}", timeout=10)
    json.loads(ws.recv())
    acks = []
    for n in range(count):
        ws.send(json.dumps({"type": "send", "client_msg_id": f"{prefix}-{n}", "to": to, "content": f"lag {n}"}))
        while True:
            frame = json.loads(ws.recv())
            if frame.get("client_msg_id") == f"{prefix}-{n}" and frame["type"] in ("ack", "error"):
                break
        assert frame["type"] == "ack", frame
        acks.append(frame)
    ws.close()
    return acks


def test_a_lagging_replica_never_makes_sync_skip_or_repeat(ha, ha_storage):
    gw = ha.gateways[0]
    alice, bob = register_and_login(gw.http), register_and_login(gw.http)
    before = _send(gw, alice, bob.user_id, 5, "before")
    reader = IncrementalSync(ha.gateways[1], bob.token)
    wait_until(lambda: reader.page() or len(reader.msg_ids) == 5, timeout=30, what="the first messages synced")
    reader.thread.start()

    cluster.stop_replication()
    stopped = time.monotonic()
    during = []
    try:
        while time.monotonic() - stopped < LAG_SECONDS:
            during += _send(gw, alice, bob.user_id, 5, f"during-{len(during)}")
            time.sleep(1)
        synced_while_lagging = len(reader.msg_ids)
    finally:
        cluster.start_replication()
    wait_until(cluster.replica_caught_up, timeout=60, interval=0.2, what="the replica to catch up")
    expected = [a["msg_id"] for a in before + during]
    wait_until(lambda: len(reader.msg_ids) >= len(expected), timeout=60, what="bob's sync to catch up")
    reader.finish()

    full = [e["msg_id"] for e in sync_all(ha.gateways, bob.token, time.monotonic() + 30) if e["type"] == "message"]
    assert len(reader.msg_ids) == len(set(reader.msg_ids)), "an entry came twice"
    assert reader.msg_ids == full, "the incremental sync skipped or reordered entries"
    assert sorted(full, key=int) == sorted(expected, key=int)
    # While the replica was stopped, sync returned nothing new rather than anything wrong.
    assert synced_while_lagging == 5
    report = {"fault": "ha-replica-stopped", "lag_seconds": LAG_SECONDS, "acked": len(expected),
              "sync_pages": reader.pages, "synced_while_lagging": synced_while_lagging,
              "repeated": len(reader.msg_ids) - len(set(reader.msg_ids)),
              "skipped": len(set(expected) - set(reader.msg_ids))}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(json.dumps(report) + "\n")
    print(json.dumps(report))


def _stored_on_primary(storage, msg_id: str) -> bool:
    from models import Message

    with storage.sessions() as session:
        return session.get(Message, int(msg_id)) is not None


def test_a_user_reads_their_own_write_while_the_replica_lags(ha, ha_storage):
    gw = ha.gateways[0]
    alice, bob = register_and_login(gw.http), register_and_login(gw.http)
    cluster.stop_replication()
    try:
        ack = _send(gw, alice, bob.user_id, 1, "own")[0]
        wait_until(lambda: _stored_on_primary(ha_storage, ack["msg_id"]), timeout=30, what="the message stored")
        assert ack["msg_id"] in _history(gw, alice, ack["conversation_id"]), \
            "alice's history hides the message she sent (read from the lagging replica)"
    finally:
        cluster.start_replication()
