"""Two people chat across two gateways: `python -m scripts.chat_demo URL1 URL2`.

Registers alice-* and bob-* on the first gateway, connects Alice to the first
and Bob to the second, sends a message each way and prints every frame.
"""
from __future__ import annotations

import json
import sys
import uuid

import requests
import websocket


def login(base: str, name: str) -> dict:
    creds = {"username": f"{name}-{uuid.uuid4().hex[:6]}", "password": "correct-horse"}
    requests.post(f"{base}/api/auth/register", json=creds, timeout=10).raise_for_status()
    resp = requests.post(f"{base}/api/auth/login", json=creds, timeout=10)
    resp.raise_for_status()
    return resp.json()


def main(gw1: str = "http://127.0.0.1:8000", gw2: str = "http://127.0.0.1:8001") -> None:
    alice, bob = login(gw1, "alice"), login(gw1, "bob")
    sockets = {
        "alice": websocket.create_connection(gw1.replace("http", "ws", 1) + "/ws?token=" + alice["access_token"], timeout=10),
        "bob": websocket.create_connection(gw2.replace("http", "ws", 1) + "/ws?token=" + bob["access_token"], timeout=10),
    }

    def show(who: str) -> dict:
        frame = json.loads(sockets[who].recv())
        print(f"{who:5} <- {json.dumps(frame, ensure_ascii=False)}")
        return frame

    def send(who: str, frame: dict) -> None:
        print(f"{who:5} -> {json.dumps(frame, ensure_ascii=False)}")
        sockets[who].send(json.dumps(frame))

    show("alice"), show("bob")
    send("alice", {"type": "send", "client_msg_id": "a-1", "to": bob["user_id"], "content": "Hi Bob 👋"})
    show("alice"), show("bob")
    send("bob", {"type": "send", "client_msg_id": "b-1", "to": alice["user_id"], "content": "Hi Alice!"})
    show("bob"), show("alice")
    for ws in sockets.values():
        ws.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
