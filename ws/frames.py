"""Parsing of client frames into typed requests (docs/protocol.md)."""
from __future__ import annotations

import json
import math
import re

from app.errors import InvalidInput, TooLarge
from app.chat.intake import SendRequest
from app.chat.typing import TYPING_STATES
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
MAX_MENTIONS = 50


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
    reply_to = parse_id(frame["reply_to"], "reply_to") if frame.get("reply_to") is not None else None
    mentions = parse_mentions(frame.get("mentions"), group_id is not None)
    return SendRequest(client_msg_id=cmid, to=to, group_id=group_id, content=content, message_type=message_type,
                       extra=extra, reply_to=reply_to, mentions=mentions)


def parse_mentions(value, in_group: bool) -> tuple[int, ...]:
    """A send's `mentions`: at most MAX_MENTIONS user ids, duplicates dropped (first one kept);
    only group messages mention anyone (whether each is a member, the intake checks)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_MENTIONS:
        raise InvalidInput(f"'mentions' must be a list of at most {MAX_MENTIONS} user id strings")
    if value and not in_group:
        raise InvalidInput("'mentions' are for group messages: a private send mentions nobody")
    return tuple(dict.fromkeys(parse_id(uid, "mentions[]") for uid in value))


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


def parse_typing(frame: dict) -> tuple[str, str]:
    conversation_id = frame.get("conversation_id")
    if not isinstance(conversation_id, str) or not CONVERSATION_ID_RE.fullmatch(conversation_id):
        raise InvalidInput("'conversation_id' must be a conversation id string such as 'p_1_2'")
    state = frame.get("state")
    if state not in TYPING_STATES:
        raise InvalidInput("'state' must be 'start' or 'stop'")
    return conversation_id, state


def check_clock(frame: dict, now_ms: int, max_skew_seconds: int) -> None:
    """Refuse a frame whose client timestamp `ts` (optional) is too far from server time: a device
    with a wrong clock is told so (docs/protocol.md)."""
    ts = frame.get("ts")
    if ts is None:
        return
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise InvalidInput("'ts' must be the client's clock in ms since the epoch (an integer)")
    skew_ms = abs(now_ms - ts)  # whole numbers: a huge ts would overflow a float division
    if max_skew_seconds and skew_ms > max_skew_seconds * 1000:
        skew = f"{skew_ms // 1000}" if skew_ms < 10**12 else "far too many"
        raise InvalidInput(f"'ts' is {skew} s away from server time (limit {max_skew_seconds} s): "
                           "check the device clock")
