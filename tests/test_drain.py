"""A gateway stopped with SIGTERM hands its clients over without losing an acknowledged message."""
import json
import signal

import websocket
from sqlalchemy import func, select

from models import Message
from tests.harness import ChatClient, Gateway, wait_until
from tests.test_sync import sync_all


def _stored(storage, user):
    with storage.sessions() as session:
        return session.scalar(select(func.count()).select_from(Message).where(Message.sender_id == int(user.user_id)))


def test_sigterm_sends_clients_elsewhere_and_every_message_arrives_once(services, cluster, make_user, connect,
                                                                         storage, log_dir):
    alice, bob = make_user(), make_user()
    draining = Gateway("gw-drain", services, log_dir, **cluster.fakes.env)
    try:
        a = ChatClient(draining.ws, alice.token)
        conn_id = a.hello["conn_id"]
        b = connect(bob, cluster.gw1)
        cmids = [f"drain-{i}" for i in range(30)]
        for cmid in cmids:  # a burst in flight when the gateway is told to stop
            a.send_json({"type": "send", "client_msg_id": cmid, "to": bob.user_id, "content": cmid})
        draining.signal(signal.SIGTERM)

        acked, close_code = {}, None
        a.ws.settimeout(15)
        while close_code is None:
            try:
                opcode, data = a.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionResetError):
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                close_code = int.from_bytes(data[:2], "big")
            elif opcode == websocket.ABNF.OPCODE_TEXT:
                frame = json.loads(data)
                if frame["type"] == "ack":
                    acked[frame["client_msg_id"]] = frame["msg_id"]
        assert close_code == 1012
        draining.proc.wait(timeout=20)  # the gateway exits by itself
        assert storage.redis.hget(f"online:user:{alice.user_id}", conn_id) is None
        assert not storage.redis.exists("gateway:alive:gw-drain")

        # The client resumes on another gateway and re-sends what was not acked, with the same ids.
        resumed = connect(alice, cluster.gw2)
        for cmid in cmids:
            answer = resumed.send_message(bob.user_id, cmid, client_msg_id=cmid)
            assert answer["type"] == "ack", answer
            assert acked.setdefault(cmid, answer["msg_id"]) == answer["msg_id"]  # acked ones keep their id
        wait_until(lambda: _stored(storage, alice) == 30, timeout=30, what="all 30 stored")
        entries, _, _ = sync_all(b)
        from_alice = [e["msg_id"] for e in entries if e["type"] == "message" and e["from"] == alice.user_id]
        assert sorted(from_alice) == sorted(acked.values())  # each exactly once
    finally:
        draining.stop()
