"""Property-based tests of the client frame parsers (docs/protocol.md §6, §10, §14-16).

For any input, the parsers either return the parsed request or raise an
app.errors.ChatError (which the gateway turns into an `error` frame); any
other exception would reach the gateway's catch-all and be answered
`internal`. Every valid frame is accepted and parsed to exactly its values.
The last test sends random malformed frames to a real gateway.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from app.errors import ChatError, InvalidInput, TooLarge
from app.chat.intake import SendRequest
from app.chat.sync import DEFAULT_LIMIT, MAX_LIMIT, parse_cursor, parse_limit
from models import Message
from tests.harness import wait_until
from ws.frames import (
    MAX_EXTRA_BYTES, MAX_EXTRA_DEPTH, check_clock, client_msg_id_of, parse_frame, parse_id, parse_read, parse_send,
)

MAX_ID = 2**63 - 1
FAST = settings(deadline=None, max_examples=100, database=None, suppress_health_check=[HealthCheck.too_slow])
CMID = re.compile(r"[\x21-\x7e]{1,64}")
DIGITS = re.compile(r"[0-9]{1,19}")
MESSAGE_TYPE = re.compile(r"[a-z][a-z0-9_]{0,19}")
KNOWN_FIELDS = ("type", "client_msg_id", "to", "group_id", "content", "message_type", "extra", "cursor", "limit",
                "conversation_id", "msg_id", "ts", "reply_to", "mentions", "state")

# --- strategies ------------------------------------------------------------------

# Anything json.loads can return, including what only Python's lenient decoder
# makes (NaN, ±Infinity, integers beyond 64 bits, lone surrogates in strings).
scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70) | \
    st.floats() | st.sampled_from([float("nan"), float("inf"), float("-inf")]) | st.text(max_size=30)
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                            max_size=4), max_leaves=12)
# Only what RFC 8259 JSON can hold and UTF-8 can encode.
clean_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
strict_scalars = st.none() | st.booleans() | st.integers(min_value=-2**64, max_value=2**64) | \
    st.floats(allow_nan=False, allow_infinity=False) | clean_text
strict_json = st.recursive(strict_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    clean_text, kids, max_size=4), max_leaves=12)

printable_ascii = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
valid_cmids = st.text(printable_ascii, min_size=1, max_size=64)
id_values = st.integers(min_value=1, max_value=MAX_ID)


@st.composite
def wire_ids(draw):
    """An id as a client may send it: a digit string (maybe zero-padded to 19 digits) or a JSON integer."""
    value = draw(id_values)
    form = draw(st.sampled_from(["str", "padded", "int"]))
    if form == "int":
        return value, value
    text = str(value)
    if form == "padded":
        text = text.rjust(draw(st.integers(len(text), 19)), "0")
    return text, value


message_types = st.from_regex(r"[a-z][a-z0-9_]{0,19}", fullmatch=True)
conversation_ids = st.from_regex(r"[a-z]_[0-9_]{1,98}", fullmatch=True)
contents = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)
extras = st.dictionaries(clean_text, strict_json, max_size=5)
unknown_fields = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in KNOWN_FIELDS), any_json, max_size=3)


@st.composite
def valid_sends(draw):
    """A valid `send` frame (docs/protocol.md §6), its byte limit and the request it must parse to."""
    cmid = draw(valid_cmids)
    target, target_id = draw(wire_ids())
    private = draw(st.booleans())
    content = draw(contents)
    size = len(content.encode("utf-8"))
    limit = draw(st.integers(size, size + 100))  # content exactly at the limit is allowed
    frame = {**draw(unknown_fields), "type": "send", "client_msg_id": cmid, "content": content}
    frame["to" if private else "group_id"] = target
    other = "group_id" if private else "to"
    if draw(st.booleans()):
        frame[other] = None  # null counts as absent
    message_type = "text"
    if draw(st.booleans()):
        message_type = frame["message_type"] = draw(message_types)
        assume(message_type not in ("image", "file"))  # those need an upload (extra.media_id): checked below
    extra = {}
    choice = draw(st.sampled_from(["absent", "null", "object"]))
    if choice == "null":
        frame["extra"] = None
    elif choice == "object":
        extra = frame["extra"] = draw(extras)
        assume(len(json.dumps(extra, ensure_ascii=False).encode("utf-8")) <= MAX_EXTRA_BYTES)
    expected = SendRequest(client_msg_id=cmid, to=target_id if private else None,
                           group_id=None if private else target_id, content=content, message_type=message_type,
                           extra=extra)
    return frame, limit, expected


def send_like():
    """Dicts shaped like a `send`: each field absent, arbitrary, or (often) valid, to reach every check."""
    def field(valid_strategy):
        return st.one_of(any_json, valid_strategy)
    return st.fixed_dictionaries({"type": st.just("send")}, optional={
        "client_msg_id": field(valid_cmids), "to": field(wire_ids().map(lambda p: p[0])),
        "group_id": field(wire_ids().map(lambda p: p[0])), "content": field(contents),
        "message_type": field(message_types), "extra": field(extras),
    })


def _only_chat_errors(fn, *args):
    """Run fn; an exception other than a ChatError (or one with an empty message) fails the test."""
    try:
        return fn(*args), None
    except ChatError as err:
        assert err.code in ("invalid_frame", "too_large", "unauthorized") and err.message, err
        return None, err


# --- parse_frame ------------------------------------------------------------------------

@FAST
@given(raw=st.text(max_size=200) | st.text(st.sampled_from('{}[]":,0123456789.eE+-tfnaluNIy\\ '), max_size=120)
       | st.text(max_size=60).map(lambda t: '{"type": "send", "extra": ' + t) | st.binary(max_size=50) | any_json)
def test_parse_frame_takes_any_input_without_crashing(raw):
    frame, err = _only_chat_errors(parse_frame, raw)
    if err is None:
        assert isinstance(raw, str) and isinstance(frame, dict) and isinstance(frame["type"], str)
    else:
        assert isinstance(err, InvalidInput)


@FAST
@given(value=strict_json | st.dictionaries(clean_text, strict_json, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({"type": clean_text | strict_scalars}).map(lambda t: {**d, **t})),
       ascii_only=st.booleans())
def test_parse_frame_returns_exactly_the_json_object(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only)  # \\u escapes or raw UTF-8
    frame, err = _only_chat_errors(parse_frame, raw)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        assert err is None and frame == value
    else:
        assert isinstance(err, InvalidInput)


@FAST
@given(depth=st.integers(1, 60_000), container=st.sampled_from(["array", "object"]), inside_send=st.booleans())
def test_deeply_nested_frames_are_invalid_not_internal_errors(depth, container, inside_send):
    inner = "[" * depth + "]" * depth if container == "array" else '{"a": ' * depth + "1" + "}" * depth
    raw = '{"type": "send", "client_msg_id": "c1", "to": "2", "content": "hi", "extra": {"a": %s}}' % inner \
        if inside_send else inner
    frame, err = _only_chat_errors(parse_frame, raw)
    assert err is None or isinstance(err, InvalidInput)
    if frame is not None and inside_send:
        _only_chat_errors(parse_send, frame, 16384)


@FAST
@given(literal=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "123456789e999"]),
       where=st.sampled_from(["extra", "limit", "ts", "content", "unknown_field"]))
def test_non_finite_numbers_are_not_json(literal, where):
    """RFC 8259 has no NaN or Infinity: accepted in `extra`, they could never be stored (MySQL refuses them)."""
    raw = '{"type": "send", "client_msg_id": "c1", "to": "2", "content": "hi", "%s": %s}' % (
        where, '{"k": [%s]}' % literal if where == "extra" else literal)
    with pytest.raises(InvalidInput):
        parse_frame(raw)


@FAST
@given(value=any_json)
def test_what_parse_frame_accepts_is_strict_json(value):
    raw = json.dumps({"type": "x", "v": value})  # Python writes NaN and Infinity for such floats
    frame, err = _only_chat_errors(parse_frame, raw)
    if err is None:
        assert json.loads(json.dumps(frame, allow_nan=False)) == frame


# --- parse_send ------------------------------------------------------------------------------

@FAST
@given(frame=send_like() | send_like().flatmap(lambda f: unknown_fields.map(lambda u: {**u, **f})),
       limit=st.integers(1, 100))
def test_parse_send_raises_only_chat_errors(frame, limit):
    request, err = _only_chat_errors(parse_send, frame, limit)
    if err is None:
        assert isinstance(request, SendRequest)
        assert (request.to is None) != (request.group_id is None)
        assert request.content and len(request.content.encode("utf-8")) <= limit
        assert client_msg_id_of(frame) == request.client_msg_id


@FAST
@given(case=valid_sends())
def test_every_valid_send_is_accepted_with_exactly_its_values(case):
    frame, limit, expected = case
    assert parse_send(frame, limit) == expected


@FAST
@given(case=valid_sends(), data=st.data())
def test_content_over_the_byte_limit_is_too_large(case, data):
    frame, _, _ = case
    size = len(frame["content"].encode("utf-8"))
    with pytest.raises(TooLarge):
        parse_send(frame, data.draw(st.integers(0, size - 1), label="limit"))


def _documented_id(value) -> bool:
    """docs/protocol.md §6: 1-19 ASCII digits, or a JSON integer, with a value in 1 ... 2^63-1."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 1 <= value <= MAX_ID
    return isinstance(value, str) and DIGITS.fullmatch(value) is not None and 1 <= int(value) <= MAX_ID


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _documented_send(frame: dict, limit: int) -> bool:
    """Whether docs/protocol.md §6 says this `send` passes the field checks (an oracle written from the doc)."""
    cmid, content = frame.get("client_msg_id"), frame.get("content")
    to, group_id = frame.get("to"), frame.get("group_id")
    message_type, extra = frame.get("message_type", "text"), frame.get("extra")
    if not (isinstance(cmid, str) and CMID.fullmatch(cmid)):
        return False
    if (to is None) == (group_id is None) or not _documented_id(to if to is not None else group_id):
        return False
    encoded = _utf8(content) if isinstance(content, str) else None
    if not encoded or len(encoded) > limit:
        return False
    if not (isinstance(message_type, str) and MESSAGE_TYPE.fullmatch(message_type)):
        return False
    if message_type in ("image", "file") and not (isinstance(extra, dict) and _documented_id(extra.get("media_id"))):
        return False  # an image or file message names its upload (§6, "Images and files")
    if extra is None:
        return True
    if not isinstance(extra, dict):
        return False
    encoded = _utf8(json.dumps(extra, ensure_ascii=False))
    return encoded is not None and len(encoded) <= MAX_EXTRA_BYTES and _depth(extra) <= MAX_EXTRA_DEPTH


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@FAST
@given(case=valid_sends(), field=st.sampled_from(["client_msg_id", "to", "group_id", "content", "message_type",
                                                  "extra"]), value=any_json | valid_cmids | message_types)
def test_a_send_with_one_field_replaced_is_refused_exactly_when_the_doc_says(case, field, value):
    frame, limit, _ = case
    frame = {**frame, field: value}
    request, err = _only_chat_errors(parse_send, frame, limit)
    assert (err is None) == _documented_send(frame, limit), (frame, err)
    if err is None:
        assert request.client_msg_id == frame["client_msg_id"] and request.content == frame["content"]


@FAST
@given(case=valid_sends(), depth=st.integers(1, 300), container=st.sampled_from(["array", "object"]))
def test_extra_nested_deeper_than_the_limit_is_refused(case, depth, container):
    frame, limit, expected = case
    value = 1
    for _ in range(depth - 1):
        value = [value] if container == "array" else {"k": value}
    frame = {**frame, "extra": {"v": value}}
    if depth <= MAX_EXTRA_DEPTH:
        assert parse_send(frame, limit).extra == frame["extra"]
    else:
        with pytest.raises(InvalidInput, match="nested"):
            parse_send(frame, limit)


# --- read / recall / ids -------------------------------------------------------------------

@FAST
@given(value=any_json | wire_ids().map(lambda p: p[0]) | st.text(st.sampled_from("0123456789²٣"), max_size=21))
def test_parse_id_takes_anything(value):
    parsed, err = _only_chat_errors(parse_id, value, "msg_id")
    if err is None:
        assert isinstance(parsed, int) and 1 <= parsed <= MAX_ID
        assert not isinstance(value, bool)
        if isinstance(value, str):
            assert value.isascii() and value.isdigit() and len(value) <= 19 and int(value) == parsed
        else:
            assert value == parsed
    else:
        assert "'msg_id'" in err.message


@FAST
@given(pair=wire_ids())
def test_parse_id_accepts_every_valid_id(pair):
    wire, value = pair
    assert parse_id(wire, "to") == value


@FAST
@given(too_big=st.integers(2**63, 10**30) | st.integers(max_value=0))
def test_ids_outside_1_to_2_63_are_refused(too_big):
    for wire in (too_big, str(too_big)):
        with pytest.raises(InvalidInput):
            parse_id(wire, "to")


@FAST
@given(frame=st.fixed_dictionaries({}, optional={"conversation_id": any_json | conversation_ids,
                                                 "msg_id": any_json | wire_ids().map(lambda p: p[0])}))
def test_parse_read_raises_only_chat_errors(frame):
    _only_chat_errors(parse_read, frame)


@FAST
@given(cid=conversation_ids, msg=wire_ids(), noise=unknown_fields)
def test_every_valid_read_is_accepted_with_exactly_its_values(cid, msg, noise):
    wire, value = msg
    assert parse_read({**noise, "type": "read", "conversation_id": cid, "msg_id": wire}) == (cid, value)


# --- sync -----------------------------------------------------------------------------------

@FAST
@given(cursor=any_json | st.text(st.sampled_from("0123456789-+ ²"), max_size=21))
def test_parse_cursor_raises_only_chat_errors(cursor):
    parsed, err = _only_chat_errors(parse_cursor, cursor)
    if err is None:
        assert cursor is None or (isinstance(cursor, str) and int(cursor) == parsed)
        assert 0 <= parsed < 2**63


@FAST
@given(position=st.integers(0, 2**63 - 1), padded=st.booleans())
def test_every_cursor_the_server_can_return_is_accepted(position, padded):
    text = str(position).rjust(19, "0") if padded else str(position)
    assert parse_cursor(text) == position
    assert parse_cursor(None) == 0


@FAST
@given(limit=any_json)
def test_parse_limit_raises_only_chat_errors(limit):
    parsed, err = _only_chat_errors(parse_limit, limit)
    if err is None:
        assert 1 <= parsed <= MAX_LIMIT


@FAST
@given(limit=st.integers(1, 10**30))
def test_every_positive_limit_is_accepted_and_capped(limit):
    assert parse_limit(limit) == min(limit, MAX_LIMIT)
    assert parse_limit(None) == DEFAULT_LIMIT


# --- the client clock (anti-replay) ----------------------------------------------------------------

@FAST
@given(ts=any_json | st.integers(min_value=-10**400, max_value=10**400), skew=st.sampled_from([0, 1, 300]))
def test_check_clock_raises_only_chat_errors(ts, skew):
    _only_chat_errors(check_clock, {"type": "ping", "ts": ts}, int(time.time() * 1000), skew)


@FAST
@given(offset_ms=st.integers(-300_000, 300_000))
def test_a_clock_within_the_skew_is_accepted(offset_ms):
    now = int(time.time() * 1000)
    assert check_clock({"type": "ping", "ts": now + offset_ms}, now, 300) is None


@FAST
@given(frame=any_json)
def test_client_msg_id_of_never_raises(frame):
    if isinstance(frame, dict):
        value = client_msg_id_of(frame)
        assert value is None or value == frame["client_msg_id"]


# --- over a real gateway --------------------------------------------------------------------------

@st.composite
def malformed_frames(draw, peer_id: str):
    """One frame the gateway must answer with an error frame (never a close, never `internal`)."""
    base = {"type": "send", "client_msg_id": draw(valid_cmids), "to": peer_id, "content": "hi"}
    kind = draw(st.sampled_from([
        "text", "not_object", "no_type", "unknown_type", "send_field", "send_both", "too_large", "extra_large",
        "sync", "read", "recall", "typing", "edit", "react", "nested", "non_finite", "ts", "binary"]))
    if kind == "text":
        text = draw(clean_text)
        try:
            value = json.loads(text)
            assume(not (isinstance(value, dict) and isinstance(value.get("type"), str)))
        except ValueError:
            pass
        return text
    if kind == "not_object":
        return json.dumps(draw(strict_json.filter(lambda v: not isinstance(v, dict))))
    if kind == "no_type":
        return json.dumps({**draw(st.dictionaries(clean_text, strict_json, max_size=3)),
                           "type": draw(strict_scalars.filter(lambda v: not isinstance(v, str)))})
    if kind == "unknown_type":
        return json.dumps({"type": draw(clean_text.filter(
            lambda t: t not in ("ping", "send", "sync", "read", "recall", "typing", "edit", "react")))})
    if kind == "send_field":
        field, bad = draw(st.sampled_from([
            ("client_msg_id", strict_scalars.filter(lambda v: not (isinstance(v, str) and CMID.fullmatch(v)))
             | st.just("has space") | st.text(printable_ascii, min_size=65, max_size=70)),
            ("to", st.sampled_from(["abc", "0", str(2**63), "1.5", "-3", "²"]) | st.booleans() | st.floats(0.5, 9.5)),
            ("content", st.just("") | st.integers() | st.lists(clean_text, max_size=2)),
            ("message_type", st.sampled_from(["Text!", None, "", "1abc", "a" * 21, "émoji", "text\n", 7])),
            ("extra", st.lists(st.integers(), max_size=2) | clean_text | st.integers() | st.booleans()),
            ("reply_to", st.sampled_from(["abc", "0", "-3", "1.5", True, {}, []])),
            ("mentions", st.sampled_from(["x", 5, {}, ["abc"], [peer_id]])),  # any mention in a private send too
        ]))
        return json.dumps({**base, field: draw(bad)})
    if kind == "send_both":
        return json.dumps({**base, "group_id": draw(st.integers(1, 10**6)).__str__()})
    if kind == "too_large":
        # Over MESSAGE_MAX_CONTENT_BYTES (2 bytes each), under WS_MAX_FRAME_BYTES once json.dumps wrote
        # each as \u00e9 (6 characters): a longer message is closed with 1009, not answered (§11).
        return json.dumps({**base, "content": "é" * draw(st.integers(8193, 10400))})
    if kind == "extra_large":
        return json.dumps({**base, "extra": {"k": "v" * draw(st.integers(4090, 6000))}})
    if kind == "sync":
        bad = draw(st.sampled_from([{"cursor": "-1"}, {"cursor": 5}, {"cursor": ""}, {"limit": 0}, {"limit": "10"},
                                    {"limit": 2.5}, {"cursor": str(2**63)}, {"limit": True}]))
        return json.dumps({"type": "sync", **bad})
    if kind == "read":
        return json.dumps({"type": "read", "conversation_id": draw(st.sampled_from(["P_1_2", "p-1-2", "", "p_"])),
                           "msg_id": "1"})
    if kind == "recall":
        return json.dumps({"type": "recall", "msg_id": draw(st.sampled_from(["", "x", "-5", None, 0, 1.5]))})
    if kind == "typing":
        return json.dumps({"type": "typing", **draw(st.sampled_from([
            {"conversation_id": "p_1_2", "state": "typing"}, {"conversation_id": "p_1_2"}, {"state": "start"},
            {"conversation_id": "p_2_1", "state": "start"}, {"conversation_id": 7, "state": "stop"},
            {"conversation_id": "q_1", "state": "start"}]))})
    if kind == "edit":  # docs/protocol.md §22: the field checks come before any lookup
        bad = draw(st.sampled_from([{"msg_id": "x", "content": "hi"}, {"msg_id": None, "content": "hi"},
                                    {"msg_id": "1", "content": ""}, {"msg_id": "1", "content": 7},
                                    {"msg_id": "1"}, {"msg_id": "1", "content": "é" * 8193}]))
        return json.dumps({"type": "edit", **bad})
    if kind == "react":  # §23
        emoji = draw(st.sampled_from(["", "ok", "👍 ", "\u0007", "👍" * 9, 3, None]) | clean_text.filter(
            lambda t: any(c.isascii() or c.isspace() for c in t)))
        good = {"msg_id": "1", "emoji": "👍", "op": "add"}
        bad = draw(st.sampled_from([{"emoji": emoji}, {"op": draw(st.sampled_from(["toggle", "", None, 1]))},
                                    {"msg_id": draw(st.sampled_from(["", "-1", 1.5, None]))}]))
        return json.dumps({"type": "react", **good, **bad})
    if kind == "nested":
        depth = draw(st.integers(900, 30_000))
        return '{"type": "send", "client_msg_id": "n1", "to": "%s", "content": "hi", "extra": {"a": %s1%s}}' % (
            peer_id, "[" * depth, "]" * depth)
    if kind == "non_finite":
        return '{"type": "send", "client_msg_id": "nan1", "to": "%s", "content": "hi", "extra": {"x": %s}}' % (
            peer_id, draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])))
    if kind == "ts":
        return json.dumps({"type": "ping", "ts": draw(st.sampled_from(["now", 1.5, -1, True, 10**400, -10**400]))})
    return draw(st.binary(min_size=1, max_size=20)).hex().encode()  # bytes: sent as a binary message


def test_a_real_gateway_answers_random_malformed_frames_and_stays_usable(cluster, make_user, connect):
    alice, bob = make_user(), make_user()
    client = connect(alice)
    seen = []

    @settings(deadline=None, max_examples=40, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(frame=malformed_frames(bob.user_id))
    def answered_with_an_error(frame):
        if isinstance(frame, bytes):
            client.ws.send_binary(frame)
        else:
            client.send_json(frame)
        error = client.next_frame(lambda f: f["type"] in ("error", "ack", "pong", "sync_batch", "read_ok",
                                                           "recalled"))
        seen.append(error)
        assert error["type"] == "error" and error["code"] in ("invalid_frame", "too_large"), (frame[:300], error)
        assert error["message"]

    answered_with_an_error()
    assert len(seen) >= 20
    client.send_json({"type": "ping"})
    client.next_frame(lambda f: f["type"] == "pong")
    ack = client.send_message(bob.user_id, "still connected after all that 👋")
    assert ack["type"] == "ack", ack


def test_extras_the_pipeline_cannot_store_are_refused_and_the_deepest_allowed_one_is_stored(
        cluster, make_user, connect, storage):
    """NaN, Infinity and deep nesting used to be acked and then never stored: MySQL's JSON refuses
    NaN and Infinity (persist retried forever), and ~700 levels killed the persist worker."""
    alice, bob = make_user(), make_user()
    client = connect(alice)
    frame = '{"type": "send", "client_msg_id": "%s", "to": "%s", "content": "hi", "extra": %s}'
    for i, extra in enumerate(['{"score": NaN}', '{"score": -Infinity}', '{"score": 1e999}']):
        client.send_json(frame % (f"bad-{i}", bob.user_id, extra))
        answer = client.next_frame(lambda f: f["type"] in ("error", "ack"))
        assert (answer["type"], answer["code"]) == ("error", "invalid_frame"), answer
    for depth in (MAX_EXTRA_DEPTH + 1, 700):  # levels, the extra object included
        cmid = f"deep-{depth}"
        client.send_json(frame % (cmid, bob.user_id, '{"a": %s}' % ("[" * (depth - 1) + "]" * (depth - 1))))
        answer = client.next_frame(lambda f: f.get("client_msg_id") == cmid)
        assert (answer["type"], answer["code"]) == ("error", "invalid_frame"), answer
    deepest = '{"a": %s}' % ("[" * (MAX_EXTRA_DEPTH - 2) + '{"b": "🙂"}' + "]" * (MAX_EXTRA_DEPTH - 2))
    client.send_json(frame % ("deepest", bob.user_id, deepest))
    ack = client.next_frame(lambda f: f.get("client_msg_id") == "deepest")
    assert ack["type"] == "ack", ack

    def stored():
        with storage.sessions() as session:
            return session.get(Message, int(ack["msg_id"]))
    assert wait_until(stored, timeout=15, what="the message with the deepest extra stored").extra == \
        json.loads(deepest)
