"""Parsing of client frames into typed requests (docs/protocol.md)."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re

from app.errors import InvalidInput, TooLarge, Unauthorized
from app.chat.intake import SendRequest
from app.chat.reactions import clean_emoji, parse_op
from app.media.uploads import MEDIA_MESSAGE_TYPES
from app.wire import CONVERSATION_ID_RE, parse_id

CLIENT_MSG_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, no spaces (fullmatch)
MESSAGE_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,19}")
MAX_EXTRA_BYTES = 4096
# Objects and arrays inside one another in `extra` (the object itself is level 1). The
# store must take whatever is acked: MariaDB refuses JSON nested more than 31 levels,
# and at ~700 the persist worker's pickling recursed until the worker died.
MAX_EXTRA_DEPTH = 16


def _not_json(literal: str):
    raise InvalidInput(f"frame is not valid JSON ({literal} is not a JSON number)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999: JSON, but no float holds it, and MySQL refuses Infinity
        raise InvalidInput(f"frame is not valid JSON ({literal[:30]} is out of range)")
    return value


def parse_frame(raw) -> dict:
    """A JSON text frame holding an object with a string `type`.

    Strict RFC 8259 JSON: Python's NaN and Infinity extensions are refused, since a
    message accepted with them in `extra` could never be stored.
    """
    if not isinstance(raw, str):
        raise InvalidInput("frames must be JSON text, not binary")
    try:
        frame = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float)
    except ValueError:
        raise InvalidInput("frame is not valid JSON") from None
    except RecursionError:
        raise InvalidInput("frame is nested too deeply") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise InvalidInput("frame must be a JSON object with a string 'type'")
    return frame


def client_msg_id_of(frame: dict) -> str | None:
    value = frame.get("client_msg_id")
    return value if isinstance(value, str) and CLIENT_MSG_ID_RE.fullmatch(value) else None


def parse_send(frame: dict, max_content_bytes: int) -> SendRequest:
    cmid = frame.get("client_msg_id")
    if not isinstance(cmid, str) or not CLIENT_MSG_ID_RE.fullmatch(cmid):
        raise InvalidInput("'client_msg_id' must be 1-64 printable ASCII characters without spaces")
    has_to, has_group = frame.get("to") is not None, frame.get("group_id") is not None
    if has_to == has_group:
        raise InvalidInput("a send needs exactly one of 'to' (private) or 'group_id' (group)")
    to = parse_id(frame["to"], "to") if has_to else None
    group_id = parse_id(frame["group_id"], "group_id") if has_group else None
    content = frame.get("content")
    if not isinstance(content, str) or not content:
        raise InvalidInput("'content' must be a non-empty string")
    if _utf8_size(content, "content") > max_content_bytes:
        raise TooLarge(f"'content' is larger than {max_content_bytes} bytes")
    message_type = frame.get("message_type", "text")
    if not isinstance(message_type, str) or not MESSAGE_TYPE_RE.fullmatch(message_type):
        raise InvalidInput("'message_type' must be lower-case letters, digits or '_' (at most 20), e.g. 'text'")
    extra = frame.get("extra")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise InvalidInput("'extra' must be a JSON object")
    if _deeper_than(extra, MAX_EXTRA_DEPTH):
        raise InvalidInput(f"'extra' is nested more than {MAX_EXTRA_DEPTH} levels deep")
    if _utf8_size(json.dumps(extra, ensure_ascii=False), "extra") > MAX_EXTRA_BYTES:
        raise TooLarge(f"'extra' is larger than {MAX_EXTRA_BYTES} bytes")
    if message_type in MEDIA_MESSAGE_TYPES:  # whose upload it is, the gateway asks the store (check_attachment)
        parse_id(extra.get("media_id"), "extra.media_id")
    return SendRequest(client_msg_id=cmid, to=to, group_id=group_id, content=content, message_type=message_type,
                       extra=extra)


def _deeper_than(value, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _utf8_size(text: str, name: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" from a JSON escape
        raise InvalidInput(f"'{name}' is not valid Unicode text") from None


def parse_edit(frame: dict, max_content_bytes: int) -> tuple[int, str]:
    """`edit`: (msg_id, content), with the content limits of a send."""
    msg_id = parse_id(frame.get("msg_id"), "msg_id")
    content = frame.get("content")
    if not isinstance(content, str) or not content:
        raise InvalidInput("'content' must be a non-empty string")
    if _utf8_size(content, "content") > max_content_bytes:
        raise TooLarge(f"'content' is larger than {max_content_bytes} bytes")
    return msg_id, content


def parse_react(frame: dict) -> tuple[int, str, str]:
    """`react`: (msg_id, emoji, op), each checked (app.chat.reactions)."""
    return parse_id(frame.get("msg_id"), "msg_id"), clean_emoji(frame.get("emoji")), parse_op(frame.get("op"))


def parse_read(frame: dict) -> tuple[str, int]:
    conversation_id = frame.get("conversation_id")
    if not isinstance(conversation_id, str) or not CONVERSATION_ID_RE.fullmatch(conversation_id):
        raise InvalidInput("'conversation_id' must be a conversation id string such as 'p_1_2'")
    return conversation_id, parse_id(frame.get("msg_id"), "msg_id")


def check_clock(frame: dict, now_ms: int, max_skew_seconds: int, required: bool = False) -> None:
    """Refuse a frame whose client timestamp `ts` is too far from server time (a replayed or forged frame)."""
    ts = frame.get("ts")
    if ts is None:
        if required:
            raise InvalidInput("'ts' (the client's clock, ms since the epoch) is required on signed frames")
        return
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise InvalidInput("'ts' must be the client's clock in ms since the epoch (an integer)")
    skew_ms = abs(now_ms - ts)  # whole numbers: a huge ts would overflow a float division
    if max_skew_seconds and skew_ms > max_skew_seconds * 1000:
        skew = f"{skew_ms // 1000}" if skew_ms < 10**12 else "far too many"
        raise InvalidInput(f"'ts' is {skew} s away from server time (limit {max_skew_seconds} s): "
                           "check the device clock")


def signing_payload(frame: dict) -> bytes:
    """What a signed `send` covers: its identity, its addressee, its content and its time (docs/protocol.md)."""
    fields = [frame.get("client_msg_id"), frame.get("to"), frame.get("group_id"),
              frame.get("message_type", "text"), frame.get("content"), frame.get("extra") or {}, frame.get("ts")]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def verify_signature(frame: dict, key: bytes) -> None:
    sig = frame.get("sig")
    if not isinstance(sig, str):
        raise Unauthorized("'sig' is required: this server verifies send frames (key in hello)")
    expected = hmac.new(key, signing_payload(frame), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sig.lower()):
        raise Unauthorized("'sig' does not match the frame: sign it with this connection's key")
