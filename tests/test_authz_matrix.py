"""Who may do what: every REST operation of docs/openapi.yaml and every WebSocket
frame, for every kind of caller, answered as docs/openapi.yaml and
docs/protocol.md (§6, §15, §16, §17, §19, §20) say.

The callers (columns):
  anon         no token at all
  bad_token    a well-formed JWT signed with another secret
  other        a user with no part in the group or the private chat
  party        a plain member of the group, and the sender of the private message
  peer         the other party of the private chat (its recipient); not in the group
  group_admin  an admin of the group
  owner        the group's owner
  admin        a site admin (admin role), in neither the group nor the chat

The world is built once for the module: one group (owner, group admin, party,
and a plain member `victim` whom removals and role changes act on), a private
chat between party and peer, a message in each, a device of party's and a
failed push record.
"""
from __future__ import annotations

import io
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import requests
import websocket
import yaml
from PIL import Image
from sqlalchemy import select, update

from models import PushLog, SyncEntry
from tests.harness import ChatClient, User, register_and_login, wait_until
from tests.test_push import make_admin

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
ROLES = ("anon", "bad_token", "other", "party", "peer", "group_admin", "owner", "admin")
PASSWORD = "correct-horse"  # tests.harness.register_and_login's


@dataclass
class World:
    base: str
    ws: str
    storage: object
    users: dict[str, User]
    group_id: str = ""
    victim: User | None = None
    newcomer: User | None = None
    device_token: str = ""
    push_id: int = 0
    media_id: str = ""
    messages: dict[str, dict] = field(default_factory=dict)

    def headers(self, role: str) -> dict:
        if role == "anon":
            return {}
        if role == "bad_token":
            forged = jwt.encode({"sub": self.users["party"].user_id, "iat": int(time.time()),
                                 "exp": int(time.time()) + 600}, "not-the-server-secret-0123456789abcdef",
                                algorithm="HS256")
            return {"Authorization": f"Bearer {forged}"}
        return {"Authorization": f"Bearer {self.users[role].token}"}

    def as_owner(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.base + path, headers=self.headers("owner"), timeout=10, **kwargs)


@pytest.fixture(scope="module")
def world(cluster, storage) -> World:
    users = {role: register_and_login(cluster.gw1.http) for role in ROLES if role not in ("anon", "bad_token")}
    make_admin(storage, users["admin"])
    w = World(cluster.gw1.http, cluster.gw1.ws, storage, users, victim=register_and_login(cluster.gw1.http),
              newcomer=register_and_login(cluster.gw1.http))
    r = w.as_owner("POST", "/api/groups", json={"name": "Authz", "members": [
        users["group_admin"].user_id, users["party"].user_id, w.victim.user_id]})
    assert r.status_code == 201, r.text
    w.group_id = r.json()["group_id"]
    r = w.as_owner("PATCH", f"/api/groups/{w.group_id}/members/{users['group_admin'].user_id}", json={"role": "admin"})
    assert r.status_code == 204, r.text
    w.device_token = secrets.token_hex(32)
    with storage.session() as session:
        push = PushLog(user_id=int(users["party"].user_id), message_id=1, push_type="apns", push_status="failed",
                       target="device:0", priority=8, error_msg="made by test_authz_matrix")
        session.add(push)
        session.flush()
        w.push_id = push.id
    return w


@pytest.fixture(scope="module")
def messages(world, storage) -> dict[str, dict]:
    """A private message from party to peer and a group message from party, stored and fanned out.

    The recall cells need the sender to be within the 2-minute recall window: the whole
    module takes well under that."""
    party = ChatClient(world.ws, world.users["party"].token)
    try:
        private = party.send_message(world.users["peer"].user_id, "a private hello")
        cmid = uuid.uuid4().hex
        party.send_json({"type": "send", "client_msg_id": cmid, "group_id": world.group_id, "content": "group hello"})
        group = party.next_frame(lambda f: f.get("client_msg_id") == cmid)
    finally:
        party.close()
    assert private["type"] == group["type"] == "ack", (private, group)

    def in_streams(msg_id, roles):
        with storage.sessions() as session:
            holders = set(session.scalars(select(SyncEntry.user_id).where(SyncEntry.message_id == int(msg_id))))
        return all(int(world.users[role].user_id) in holders for role in roles)

    wait_until(lambda: in_streams(private["msg_id"], ["party", "peer"]), what="the private message stored")
    wait_until(lambda: in_streams(group["msg_id"], ["party", "group_admin", "owner"]),
               what="the group message fanned out")
    world.messages = {"private": private, "group": group}
    return world.messages


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def _upload(w, role):
    return {"data": _png(), "headers": {"Content-Type": "image/png"}}


def _party_media(w, role, suffix=""):
    """A picture the party uploaded and sent to no one: only the uploader may fetch it."""
    if not w.media_id:
        r = requests.post(w.base + "/api/media", data=_png(), timeout=10,
                          headers={**w.headers("party"), "Content-Type": "image/png"})
        assert r.status_code in (200, 201), r.text
        w.media_id = r.json()["media_id"]
    return {"path": f"/api/media/{w.media_id}{suffix}"}


# --- REST ------------------------------------------------------------------------------------
# Each row: the documented operation, what the cell is about, the request (built from the world
# and the caller's role), and the documented status for each role, in the order of ROLES.
#          anon bad  other party peer gadm owner admin

# A row's last item makes the cell's request (path, json, params) or, returning None, prepares the world.

def _member_back(w: World, role: str) -> None:
    """Removal and role cells act on `victim`: make it a plain member again first."""
    w.as_owner("POST", f"/api/groups/{w.group_id}/members", json={"user_ids": [w.victim.user_id]}).raise_for_status()
    r = w.as_owner("PATCH", f"/api/groups/{w.group_id}/members/{w.victim.user_id}", json={"role": "member"})
    assert r.status_code == 204, r.text


def _device_back(w: World, role: str) -> None:
    r = requests.post(f"{w.base}/api/devices", json={"platform": "ios", "token": w.device_token},
                      headers=w.headers("party"), timeout=10)
    assert r.status_code == 201, r.text


def _push_failed_again(w: World, role: str) -> None:
    with w.storage.session() as session:
        session.execute(update(PushLog).where(PushLog.id == w.push_id).values(push_status="failed"))


def _doomed_group(w: World, role: str) -> dict:
    """A fresh group like the world's (owner, group admin, party) for one deletion cell."""
    r = w.as_owner("POST", "/api/groups", json={"name": "Doomed", "members": [
        w.users["group_admin"].user_id, w.users["party"].user_id]})
    gid = r.json()["group_id"]
    r = w.as_owner("PATCH", f"/api/groups/{gid}/members/{w.users['group_admin'].user_id}", json={"role": "admin"})
    assert r.status_code == 204, r.text
    return {"path": f"/api/groups/{gid}"}


def _another_session(w: World, role: str):
    """Logout cells end a session of the caller's other than the one the other cells use."""
    if role in ("anon", "bad_token"):
        return None
    r = requests.post(f"{w.base}/api/auth/login", json={"username": w.users[role].username, "password": PASSWORD},
                      timeout=10)
    assert r.status_code == 200, r.text
    return {"headers": {"Authorization": f"Bearer {r.json()['access_token']}"}}


def _throwaway_user(w: World, role: str):
    """logout-all ends every session of the caller: a user of its own stands in for the role's."""
    if role in ("anon", "bad_token"):
        return None
    return {"headers": {"Authorization": f"Bearer {register_and_login(w.base).token}"}}


REST = [
    ("POST", "/api/auth/register", "a new account", "201 201 201 201 201 201 201 201",
     lambda w, role: {"json": {"username": f"r{uuid.uuid4().hex[:12]}", "password": PASSWORD}}),
    ("POST", "/api/auth/login", "the party's credentials", "200 200 200 200 200 200 200 200",
     lambda w, role: {"json": {"username": w.users["party"].username, "password": PASSWORD}}),
    ("POST", "/api/auth/refresh", "a refresh token never issued", "401 401 401 401 401 401 401 401",
     lambda w, role: {"json": {"refresh_token": "never-issued-" + "x" * 32}}),
    ("POST", "/api/auth/logout", "another session of mine", "401 401 204 204 204 204 204 204", _another_session),
    ("POST", "/api/auth/logout-all", "every session of mine", "401 401 204 204 204 204 204 204", _throwaway_user),
    ("POST", "/api/ws-ticket", "a ticket for my socket", "401 401 201 201 201 201 201 201", None),
    ("PUT", "/api/account/password", "mine, with a wrong old password", "401 401 403 403 403 403 403 403",
     lambda w, role: {"json": {"old_password": "not-the-password", "new_password": "another-long-password"}}),
    ("POST", "/api/groups", "a new group", "401 401 201 201 201 201 201 201",
     lambda w, role: {"json": {"name": f"{role}'s group", "members": []}}),
    ("GET", "/api/groups", "my groups", "401 401 200 200 200 200 200 200", None),
    ("GET", "/api/groups/{group_id}/members", "the group", "401 401 403 200 403 200 200 403", None),
    ("GET", "/api/groups/{group_id}/members", "a group that does not exist", "401 401 404 404 404 404 404 404",
     lambda w, role: {"path": "/api/groups/987654321987/members"}),
    ("POST", "/api/groups/{group_id}/members", "add a user", "401 401 403 403 403 200 200 403",
     lambda w, role: {"json": {"user_ids": [w.newcomer.user_id]}}),
    ("DELETE", "/api/groups/{group_id}/members/{user_id}", "remove a plain member",
     "401 401 403 403 403 204 204 403", _member_back),
    ("DELETE", "/api/groups/{group_id}/members/{user_id}", "a group that does not exist",
     "401 401 404 404 404 404 404 404",
     lambda w, role: {"path": f"/api/groups/987654321987/members/{w.victim.user_id}"}),
    ("PATCH", "/api/groups/{group_id}", "rename the group", "401 401 403 403 403 204 204 403",
     lambda w, role: {"json": {"name": f"renamed by {role}"}}),
    ("DELETE", "/api/groups/{group_id}", "delete a group", "401 401 403 403 403 403 204 403", _doomed_group),
    ("DELETE", "/api/groups/{group_id}", "a group that does not exist", "401 401 404 404 404 404 404 404",
     lambda w, role: {"path": "/api/groups/987654321987"}),
    ("PATCH", "/api/groups/{group_id}/members/{user_id}", "make a plain member a member",
     "401 401 403 403 403 403 204 403", lambda w, role: _member_back(w, role) or {"json": {"role": "member"}}),
    ("GET", "/api/conversations", "my list", "401 401 200 200 200 200 200 200", None),
    ("GET", "/api/conversations/{conversation_id}/messages", "the private chat", "401 401 403 200 200 403 403 403",
     None),
    ("GET", "/api/conversations/{conversation_id}/messages", "the group chat", "401 401 403 200 403 200 200 403",
     lambda w, role: {"path": f"/api/conversations/g_{w.group_id}/messages"}),
    ("GET", "/api/conversations/{conversation_id}/messages", "a chat that does not exist",
     "401 401 404 404 404 404 404 404", lambda w, role: {"path": "/api/conversations/p_987654321_987654322/messages"}),
    ("GET", "/api/conversations/{conversation_id}/messages/{msg_id}/receipts", "the private message's",
     "401 401 403 200 403 403 403 403",
     lambda w, role: {"path": f"/api/conversations/{_private_conversation(w)}/messages/"
                              f"{w.messages['private']['msg_id']}/receipts"}),
    ("GET", "/api/conversations/{conversation_id}/messages/{msg_id}/receipts", "the group message's",
     "401 401 403 200 403 403 403 403",
     lambda w, role: {"path": f"/api/conversations/g_{w.group_id}/messages/{w.messages['group']['msg_id']}/receipts"}),
    ("GET", "/api/conversations/{conversation_id}/messages/{msg_id}/receipts", "a message not in the chat",
     "401 401 403 404 404 403 403 403", None),
    ("GET", "/api/unread", "my counts", "401 401 200 200 200 200 200 200", None),
    ("GET", "/api/users", "look up the party", "401 401 200 200 200 200 200 200",
     lambda w, role: {"params": {"username": w.users["party"].username}}),
    ("GET", "/api/users/{user_id}", "the party's name", "401 401 200 200 200 200 200 200", None),
    ("GET", "/api/users/{user_id}", "a user that does not exist", "401 401 404 404 404 404 404 404",
     lambda w, role: {"path": "/api/users/987654321987"}),
    ("GET", "/api/users/{user_id}/presence", "the party", "401 401 200 200 200 200 200 200", None),
    ("GET", "/api/users/{user_id}/presence", "a user that does not exist", "401 401 404 404 404 404 404 404",
     lambda w, role: {"path": "/api/users/987654321987/presence"}),
    ("GET", "/api/devices", "my devices", "401 401 200 200 200 200 200 200", None),
    ("POST", "/api/devices", "a new token", "401 401 201 201 201 201 201 201",
     lambda w, role: {"json": {"platform": "android", "token": f"authz-{role}-{uuid.uuid4().hex}"}}),
    ("DELETE", "/api/devices/{token}", "the party's token", "401 401 404 204 404 404 404 404", _device_back),
    ("GET", "/api/push-settings", "mine", "401 401 200 200 200 200 200 200", None),
    ("PUT", "/api/push-settings", "mine", "401 401 200 200 200 200 200 200",
     lambda w, role: {"json": {"preview": True}}),
    ("POST", "/api/push-settings/email/verify", "with no address waiting", "401 401 409 409 409 409 409 409",
     lambda w, role: {"json": {"code": "000000"}}),
    ("GET", "/api/admin/pushes", "the party's", "401 401 403 403 403 403 403 200",
     lambda w, role: {"params": {"user_id": w.users["party"].user_id}}),
    ("POST", "/api/admin/pushes/{push_id}/retry", "a failed push", "401 401 403 403 403 403 403 202",
     _push_failed_again),
    ("POST", "/api/admin/pushes/retry", "the party's failed pushes", "401 401 403 403 403 403 403 202",
     lambda w, role: {"json": {"user_id": w.users["party"].user_id, "status": "failed"}}),
    ("GET", "/api/blocks", "my blocks", "401 401 200 200 200 200 200 200", None),
    ("PUT", "/api/blocks/{user_id}", "block the newcomer", "401 401 204 204 204 204 204 204",
     lambda w, role: {"path": f"/api/blocks/{w.newcomer.user_id}"}),
    ("DELETE", "/api/blocks/{user_id}", "unblock the newcomer", "401 401 204 204 204 204 204 204",
     lambda w, role: {"path": f"/api/blocks/{w.newcomer.user_id}"}),
    ("GET", "/api/privacy", "mine", "401 401 200 200 200 200 200 200", None),
    ("PUT", "/api/privacy", "mine (everyone)", "401 401 200 200 200 200 200 200",
     lambda w, role: {"json": {"presence": "everyone"}}),
    ("GET", "/api/account/export", "my data", "401 401 200 200 200 200 200 200", None),
    ("DELETE", "/api/account", "mine, with a wrong password", "401 401 403 403 403 403 403 403",
     lambda w, role: {"json": {"password": "not-the-password"}}),
    ("DELETE", "/api/admin/messages/{msg_id}", "a message that does not exist", "401 401 403 403 403 403 403 404",
     None),
    ("GET", "/api/admin/audit", "the log", "401 401 403 403 403 403 403 200", None),
    ("POST", "/api/media", "a picture", "401 401 201 201 201 201 201 201", _upload),
    ("GET", "/api/media/{media_id}", "the party's unsent upload", "401 401 403 200 403 403 403 403", _party_media),
    ("GET", "/api/media/{media_id}/thumbnail", "the party's unsent upload", "401 401 403 200 403 403 403 403",
     lambda w, role: _party_media(w, role, "/thumbnail")),
    ("GET", "/api/search/messages", "my messages", "401 401 200 200 200 200 200 200",
     lambda w, role: {"params": {"q": "hello"}}),
    ("GET", "/api/push/vapid-public-key", "the server's Web Push key (public)", "200 200 200 200 200 200 200 200",
     None),
    ("GET", "/healthz", "liveness", "200 200 200 200 200 200 200 200", None),
    ("GET", "/readyz", "readiness", "200 200 200 200 200 200 200 200", None),
]


def _default_path(w: World, template: str) -> str:
    return template.format(group_id=w.group_id, user_id=(w.victim.user_id if "/members/" in template
                                                          else w.users["party"].user_id),
                           conversation_id=_private_conversation(w), token=w.device_token, push_id=w.push_id,
                           media_id=w.media_id, msg_id="987654321987")


def _private_conversation(w: World) -> str:
    low, high = sorted((int(w.users["party"].user_id), int(w.users["peer"].user_id)))
    return f"p_{low}_{high}"


def test_the_table_covers_every_documented_operation():
    spec = yaml.safe_load(SPEC.read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops
                  if method in ("get", "post", "put", "patch", "delete")}
    in_table = {(method, path) for method, path, *_ in REST}
    assert documented - in_table == set(), "add these operations to REST in tests/test_authz_matrix.py"
    assert in_table - documented == set(), "the table names operations docs/openapi.yaml does not have"
    for *_, expected, _ in REST:
        assert len(expected.split()) == len(ROLES)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method, path, what, expected, make", REST,
                         ids=[f"{m} {p} ({what})" for m, p, what, *_ in REST])
def test_rest(world, messages, role, method, path, what, expected, make):
    kwargs = (make(world, role) if make is not None else None) or {}
    url = world.base + kwargs.pop("path", _default_path(world, path))
    headers = {**world.headers(role), **kwargs.pop("headers", {})}
    r = requests.request(method, url, headers=headers, timeout=10, **kwargs)
    want = int(expected.split()[ROLES.index(role)])
    assert r.status_code == want, f"{role}: {method} {url} -> {r.status_code} {r.text[:300]}"
    if want >= 400:
        assert r.json()["error"] == {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict"}[want], \
            r.text


# --- WebSocket -----------------------------------------------------------------------------------
# Expected: the reply's type, an error code, or 401 (the upgrade is refused, docs/protocol.md §3).
#          anon bad  other      party      peer          gadm       owner      admin

WS = [
    ("ping", "401 401 pong pong pong pong pong pong"),
    ("send private (to peer)", "401 401 ack ack invalid_frame ack ack ack"),
    ("send group", "401 401 forbidden ack forbidden ack ack forbidden"),
    ("sync", "401 401 sync_batch sync_batch sync_batch sync_batch sync_batch sync_batch"),
    ("read private", "401 401 forbidden read_ok read_ok forbidden forbidden forbidden"),
    ("read group", "401 401 forbidden read_ok forbidden read_ok read_ok forbidden"),
    # Before the recall rows: a recalled message takes no edit or reaction (docs/protocol.md §19, §20).
    ("edit private (party's)", "401 401 not_found edited forbidden not_found not_found not_found"),
    ("edit group (party's)", "401 401 not_found edited not_found forbidden forbidden not_found"),
    ("react private", "401 401 not_found reaction reaction not_found not_found not_found"),
    ("react group", "401 401 not_found reaction not_found reaction reaction not_found"),
    ("recall private (party's)", "401 401 not_found recalled forbidden not_found not_found not_found"),
    ("recall group (party's)", "401 401 not_found recalled not_found forbidden recalled not_found"),
]


def _frame(w: World, messages: dict, kind: str) -> dict:
    private, group = messages["private"], messages["group"]
    return {
        "ping": {"type": "ping"},
        "send private (to peer)": {"type": "send", "to": w.users["peer"].user_id, "content": "hi"},
        "send group": {"type": "send", "group_id": w.group_id, "content": "hi all"},
        "sync": {"type": "sync", "cursor": None, "limit": 10},
        "read private": {"type": "read", "conversation_id": private["conversation_id"], "msg_id": private["msg_id"]},
        "read group": {"type": "read", "conversation_id": group["conversation_id"], "msg_id": group["msg_id"]},
        "edit private (party's)": {"type": "edit", "msg_id": private["msg_id"], "content": "a private hello, edited"},
        "edit group (party's)": {"type": "edit", "msg_id": group["msg_id"], "content": "group hello, edited"},
        "react private": {"type": "react", "msg_id": private["msg_id"], "emoji": "👍", "op": "add"},
        "react group": {"type": "react", "msg_id": group["msg_id"], "emoji": "👍", "op": "add"},
        "recall private (party's)": {"type": "recall", "msg_id": private["msg_id"]},
        "recall group (party's)": {"type": "recall", "msg_id": group["msg_id"]},
    }[kind]


REPLIES = {"ping": "pong", "send": "ack", "sync": "sync_batch", "read": "read_ok", "recall": "recalled",
           "edit": "edited", "react": "reaction"}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind, expected", WS, ids=[kind for kind, _ in WS])
def test_websocket(world, messages, role, kind, expected):
    want = expected.split()[ROLES.index(role)]
    if role in ("anon", "bad_token"):
        header = [f"{k}: {v}" for k, v in world.headers(role).items()]
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(world.ws, header=header, timeout=10)
        assert refused.value.status_code == int(want)
        return
    frame = dict(_frame(world, messages, kind))
    if frame["type"] == "send":
        frame["client_msg_id"] = uuid.uuid4().hex
    # A fresh connection per cell: it gets no live frame caused by an earlier cell.
    reply_type = REPLIES[frame["type"]]

    def answers(f: dict) -> bool:
        if f["type"] == "error":
            return True
        return f["type"] == reply_type and (frame["type"] != "send" or f["client_msg_id"] == frame["client_msg_id"])

    client = ChatClient(world.ws, world.users[role].token)
    try:
        client.send_json(frame)
        answer = client.next_frame(answers)
    finally:
        client.close()
    got = answer["code"] if answer["type"] == "error" else answer["type"]
    assert got == want, f"{role} {kind}: {answer}"
