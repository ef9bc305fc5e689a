"""Typing (app.chat.typing): the gateway's in-memory pre-filter mirrors the Redis relay limit;
conversation ids are read as the server writes them."""
import pytest

from app.chat.typing import RecentTyping, parse_conversation
from app.errors import InvalidInput


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_second_start_within_the_second_is_dropped_a_stop_after_a_start_is_not():
    clock = Clock()
    recent = RecentTyping(clock)
    assert recent.may_relay("p_1_2", "start")
    recent.relayed("p_1_2", "start")
    clock.now += 0.5
    assert not recent.may_relay("p_1_2", "start")
    assert recent.may_relay("p_1_2", "stop")
    recent.relayed("p_1_2", "stop")
    assert not recent.may_relay("p_1_2", "start") and not recent.may_relay("p_1_2", "stop")
    assert recent.may_relay("g_7", "start")  # another conversation has its own second
    clock.now += 1.0
    assert recent.may_relay("p_1_2", "start")


def test_a_refused_frame_is_not_remembered():
    recent = RecentTyping(Clock())
    assert recent.may_relay("g_7", "start")  # (the gateway then gets forbidden and records nothing)
    assert recent.may_relay("g_7", "start")


def test_conversation_ids_are_read_as_the_server_writes_them():
    assert parse_conversation("p_3_12") == ("p", (3, 12))
    assert parse_conversation("g_7") == ("g", (7,))
    for bad in ("p_12_3", "p_3_3", "p_03_12", "g_0", "g_07", "g_7_8", "p_3", f"g_{2**63}", "x_1", "p__3"):
        with pytest.raises(InvalidInput):
            parse_conversation(bad)
