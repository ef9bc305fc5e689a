"""The gateway's in-memory pre-filter of typing frames mirrors the Redis relay limit."""
from app.chat.typing import RecentTyping


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
