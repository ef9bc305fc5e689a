"""Rate limits (app.ratelimit): Redis token buckets shared by gateways, and a connection's own bucket."""
import dataclasses

import pytest

from app.errors import RateLimited
from app.ratelimit import Limit, LocalBucket, limit_login, limit_registration, take
from app.storage import Storage
from tests.harness import wait_until


def _refused(fn) -> RateLimited | None:
    try:
        fn()
    except RateLimited as exc:
        return exc
    return None


def test_a_burst_is_allowed_then_refused_with_when_to_retry(storage):
    limit = Limit(rate=1.0, burst=3)
    for _ in range(3):
        take(storage, "send", 1, limit, "messages")
    refused = _refused(lambda: take(storage, "send", 1, limit, "messages"))
    assert refused is not None and 0 < refused.retry_after_ms <= 1000
    assert refused.message.startswith("too many messages; retry in ")
    take(storage, "send", 2, limit, "messages")  # another user has a bucket of their own
    take(storage, "connect", 1, limit, "connections")  # and so has another action


def test_a_bucket_refills_at_its_rate(storage):
    limit = Limit(rate=20.0, burst=1)  # a token every 50 ms
    take(storage, "send", 1, limit, "messages")
    refused = _refused(lambda: take(storage, "send", 1, limit, "messages"))
    assert refused is not None and refused.retry_after_ms <= 50
    wait_until(lambda: _refused(lambda: take(storage, "send", 1, limit, "messages")) is None, timeout=2,
               what="a token after the refill")


def test_a_limit_of_zero_is_switched_off(storage):
    for _ in range(100):
        take(storage, "send", 1, Limit(rate=0, burst=0), "messages")


def test_logins_are_limited_per_account_from_any_address_and_per_address(storage):
    burst = storage.settings.login_burst
    for i in range(burst):
        limit_login(storage, f"10.0.0.{i}", "Alice")
    refused = _refused(lambda: limit_login(storage, "10.0.1.1", " alice"))  # the same account, spelled otherwise
    assert refused is not None and "login attempts for this account" in refused.message

    for i in range(burst):
        limit_login(storage, "10.9.9.9", f"user{i}")
    refused = _refused(lambda: limit_login(storage, "10.9.9.9", "someone-new"))
    assert refused is not None and "login attempts from this address" in refused.message


def test_registrations_are_limited_per_address(storage):
    for _ in range(storage.settings.register_burst):
        limit_registration(storage, "10.1.1.1")
    refused = _refused(lambda: limit_registration(storage, "10.1.1.1"))
    assert refused is not None and "registrations from this address" in refused.message
    limit_registration(storage, "10.1.1.2")


def test_limits_are_not_enforced_while_redis_is_down(storage):
    down = Storage(dataclasses.replace(storage.settings, redis_url="redis://127.0.0.1:1/0"))
    try:
        for _ in range(5):
            take(down, "send", 1, Limit(rate=1.0, burst=1), "messages")
    finally:
        down.dispose()


def test_a_connections_frame_bucket_refills_with_its_clock(clock):
    bucket = LocalBucket(Limit(rate=2.0, burst=3), clock=clock)
    assert [bucket.take() for _ in range(4)] == [0, 0, 0, 500]  # the fourth waits for half a second
    clock.advance(0.25)
    assert bucket.take() == 250
    clock.advance(0.25)
    assert bucket.take() == 0
    clock.advance(3600)  # a long silence fills the bucket to its burst, no more
    assert [bucket.take() for _ in range(4)] == [0, 0, 0, 500]


@pytest.mark.parametrize("count, burst, rate", [(60, 5, 1.0), (6, 1, 0.1)])
def test_per_minute_limits_are_rates_per_second(count, burst, rate):
    assert Limit.per_minute(count, burst) == Limit(rate, burst)
