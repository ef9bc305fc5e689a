"""A steady chat load for the fault suite: senders that behave like real clients.

Each sender holds one connection (to any gateway that answers), sends one
message at a time to its peer with a fresh client_msg_id, and on an error
frame, a dropped socket or no answer retries the SAME client_msg_id (after
reconnecting if needed) until it is acked. So "acked" below means what a
user saw; anything acked must end up stored once and in the recipient's
sync stream once.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import websocket

ANSWER_TIMEOUT = 15.0  # an open socket that stays silent this long counts as silence


@dataclass
class SenderStats:
    acked: dict = field(default_factory=dict)  # client_msg_id -> msg_id
    errors: Counter = field(default_factory=Counter)
    reconnects: int = 0
    silences: int = 0
    last_ack_at: float = 0.0


class Sender:
    def __init__(self, user, peer_id: str, gateways: list, prefix: str, interval: float, first_gateway: int = 0):
        self.user, self.peer_id, self.gateways = user, peer_id, gateways
        self.prefix, self.interval = prefix, interval
        self.stats = SenderStats()
        self.ws = None
        self._gateway_index = first_gateway  # spread over the gateways: every fault hits some senders
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"sender-{user.user_id}")

    def start(self) -> "Sender":
        self.thread.start()
        return self

    def finish(self, timeout: float = 60.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        self._close()

    def _connect(self) -> bool:
        for _ in range(len(self.gateways)):
            gateway = self.gateways[self._gateway_index % len(self.gateways)]
            self._gateway_index += 1
            if not gateway.alive():
                continue
            try:
                self.ws = websocket.create_connection(f"{gateway.ws}?token={self.user.token}", timeout=5)
                hello = json.loads(self.ws.recv())
                if hello.get("type") == "hello":
                    return True
            except Exception:
                pass
            self._close()
        return False

    def _close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close(timeout=0.2)
            except Exception:
                pass
            self.ws = None

    def _send_until_acked(self, cmid: str, content: str) -> None:
        """Retry one message until acked (or the run is told to stop with it unacked)."""
        while not self.stop.is_set():
            if self.ws is None:
                if not self._connect():
                    time.sleep(0.3)
                    continue
                self.stats.reconnects += 1
            try:
                self.ws.send(json.dumps({"type": "send", "client_msg_id": cmid, "to": self.peer_id,
                                         "content": content}))
                answer = self._answer(cmid)
            except Exception:  # the socket dropped: reconnect and retry the same id
                self._close()
                continue
            if answer is None:
                self.stats.silences += 1
                self._close()
            elif answer["type"] == "ack":
                self.stats.acked[cmid] = answer["msg_id"]
                self.stats.last_ack_at = time.monotonic()
                return
            else:
                self.stats.errors[answer.get("code")] += 1
                time.sleep(max(0.2, answer.get("retry_after_ms", 0) / 1000))

    def _answer(self, cmid: str) -> dict | None:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                return None
            if not raw:
                raise ConnectionError("closed")
            frame = json.loads(raw)
            if frame.get("client_msg_id") == cmid and frame["type"] in ("ack", "error"):
                return frame
        return None

    def _run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            self._send_until_acked(f"{self.prefix}-{seq}", f"steady load {seq}")
            seq += 1
            self.stop.wait(self.interval)


def sync_all(gateways: list, token: str, deadline: float) -> list[dict]:
    """A recipient's whole sync stream from the start, over any gateway that answers."""
    while time.monotonic() < deadline:
        for gateway in gateways:
            if not gateway.alive():
                continue
            try:
                ws = websocket.create_connection(f"{gateway.ws}?token={token}", timeout=10)
                json.loads(ws.recv())
                entries, cursor = [], None
                while True:
                    ws.send(json.dumps({"type": "sync", "cursor": cursor, "limit": 500}))
                    while True:
                        frame = json.loads(ws.recv())
                        if frame["type"] == "sync_batch":
                            break
                    entries += frame["messages"]
                    cursor = frame["cursor"]
                    if not frame["has_more"]:
                        ws.close()
                        return entries
            except Exception:
                time.sleep(0.5)
    raise AssertionError("no gateway answered a sync")
