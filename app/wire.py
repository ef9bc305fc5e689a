"""The wire format: what the server sends (frames, sync entries, delivery envelopes)
and the ids clients send.

One place for every shape a client or a gateway reads (docs/protocol.md):
domain modules build their results with these functions and never write a
frame's keys themselves. Ids are strings on the wire (snowflakes exceed 2^53).
"""
from __future__ import annotations

import json
import re

from app.errors import InvalidInput
from models import STATUS_RECALLED

ID_RE = re.compile(r"[0-9]{1,19}")
MAX_ID = 2**63  # ids are signed 64-bit in the database
CONVERSATION_ID_RE = re.compile(r"[a-z]_[0-9_]{1,98}")  # p_<low>_<high>, g_<group id>


def parse_id(value, name: str) -> int:
    """An id a client sent (frame field, REST body or path): ids travel as decimal strings
    (snowflakes exceed 2^53); integers are tolerated."""
    if isinstance(value, bool):
        raise InvalidInput(f"'{name}' must be an id string")
    if isinstance(value, int) and 0 < value < MAX_ID:
        return value
    if isinstance(value, str) and ID_RE.fullmatch(value) and 0 < int(value) < MAX_ID:
        return int(value)
    raise InvalidInput(f"'{name}' must be an id string of digits")


def message_frame(msg) -> dict:
    """The live `message` frame, also a sync entry and a history item; `msg` is a
    Message or a row with its columns."""
    return {
        "type": "message", "msg_id": str(msg.id), "client_msg_id": msg.client_msg_id,
        "conversation_id": msg.conversation_id, "from": str(msg.sender_id),
        "to": str(msg.receiver_id) if msg.receiver_id is not None else None,
        "group_id": str(msg.group_id) if msg.group_id is not None else None,
        "message_type": msg.message_type, "content": msg.content if msg.status != STATUS_RECALLED else "",
        "extra": msg.extra or {}, "timestamp": msg.timestamp, "status": msg.status,
        "reply_to": str(msg.reply_to_msg_id) if msg.reply_to_msg_id is not None else None,
        "mentions": list(msg.mentions or []),
        "edited_at": msg.edited_at, "reactions": (msg.reactions or {}) if msg.status != STATUS_RECALLED else {},
    }


def typing_frame(conversation_id: str, user_id: int, state: str) -> dict:
    """`typing`: live only, to the other parties' connections (never stored, synced or pushed)."""
    return {"type": "typing", "conversation_id": conversation_id, "user_id": str(user_id), "state": state}


def recalled_frame(msg_id: int, conversation_id: str, recalled_at: int | None = None, by: str | None = None) -> dict:
    """`recalled`: live to every party, and as a sync entry (with the recall's time). `by`: "sender",
    "owner" (a group's owner) or "admin" (a moderator removed it); rows from before it was stored: "sender"."""
    frame = {"type": "recalled", "msg_id": str(msg_id), "conversation_id": conversation_id, "by": by or "sender"}
    if recalled_at is not None:
        frame["timestamp"] = recalled_at
    return frame


def group_event_frame(event) -> dict:
    """`group_event`: live to the members after the change and the users it removed, and as a
    sync entry; `event` is a GroupEvent (docs/protocol.md §19)."""
    return {
        "type": "group_event", "event_id": str(event.id), "group_id": str(event.group_id),
        "conversation_id": f"g_{event.group_id}", "event": event.event,
        "actor_id": str(event.actor_id) if event.actor_id is not None else None,
        "user_ids": [str(uid) for uid in event.user_ids or []], "name": event.name, "role": event.role,
        "timestamp": event.timestamp,
    }


def edited_frame(msg_id: int, conversation_id: str, content: str, edited_at: int) -> dict:
    """`edited`: live to every party, and as a sync entry (the content that edit set)."""
    return {"type": "edited", "msg_id": str(msg_id), "conversation_id": conversation_id, "content": content,
            "edited_at": edited_at}


def reaction_frame(msg_id: int, conversation_id: str, user_id: int, emoji: str, op: str) -> dict:
    """`reaction`: live to every party, and as a sync entry; `op` is "add" or "remove"."""
    return {"type": "reaction", "msg_id": str(msg_id), "conversation_id": conversation_id,
            "user_id": str(user_id), "emoji": emoji, "op": op}


def ack_frame(client_msg_id: str, msg_id: int, conversation_id: str, timestamp: int) -> dict:
    return {"type": "ack", "client_msg_id": client_msg_id, "msg_id": str(msg_id),
            "conversation_id": conversation_id, "timestamp": timestamp}


def read_ok_frame(conversation_id: str, msg_id: int) -> dict:
    return {"type": "read_ok", "conversation_id": conversation_id, "msg_id": str(msg_id)}


def receipt_frame(conversation_id: str, reader_id: int, msg_id: int, kind: str = "read",
                  timestamp: int | None = None) -> dict:
    """`receipt`: `reader` has every message of the conversation up to msg_id (`kind` "delivered") or has
    read them ("read"); live to the peer, and as the peer's sync entry (with the time it was applied)."""
    frame = {"type": "receipt", "kind": kind, "conversation_id": conversation_id, "reader": str(reader_id),
             "msg_id": str(msg_id)}
    if timestamp is not None:
        frame["timestamp"] = timestamp
    return frame


def error_frame(code: str, message: str, client_msg_id: str | None = None,
                retry_after_ms: int | None = None) -> dict:
    """An error frame, naming the client_msg_id of the send it answers when it had a valid one."""
    reply = {"type": "error", "code": code, "message": message}
    if retry_after_ms is not None:
        reply["retry_after_ms"] = retry_after_ms
    if client_msg_id:
        reply["client_msg_id"] = client_msg_id
    return reply


# Delivery envelopes: what dispatch publishes on a gateway's delivery channel
# (`gateway:{id}:deliver`) and ws/gateway.py reads back.

def frame_envelope(conn_ids: list[str], frame_json: str) -> str:
    """A frame (already JSON) for these connections of one gateway."""
    return json.dumps({"conns": conn_ids, "frame": frame_json})


def close_envelope(conn_ids: list[str], code: int, reason: str, sessions: list[str] | None = None) -> str:
    """Ask one gateway to close these connections (an account cut off) after what is queued;
    with `sessions`, only those of them opened with a token of these login sessions."""
    envelope = {"conns": conn_ids, "close": code, "reason": reason}
    if sessions is not None:
        envelope["sessions"] = sessions
    return json.dumps(envelope)


def parse_envelope(raw: str) -> tuple[list[str], str | None, int | None, str, set[str] | None]:
    """(connections, frame JSON or None, close code or None, reason, the login sessions a close is
    limited to or None for all); ValueError when malformed."""
    try:
        envelope = json.loads(raw)
        conn_ids = envelope["conns"]
        if "close" in envelope:
            sessions = envelope.get("sessions")
            return (conn_ids, None, int(envelope["close"]), str(envelope.get("reason", ""))[:120],
                    set(map(str, sessions)) if isinstance(sessions, list) else None)
        return conn_ids, envelope["frame"], None, "", None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("malformed delivery envelope") from exc
