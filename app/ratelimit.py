"""Rate limits: token buckets in Redis, shared by every gateway.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second;
each action takes one. The check-and-take is one Lua script on Redis's own
clock, so it is atomic across gateways and immune to their clock skew.

If Redis cannot answer, limits are not enforced (logged): a chat server that
refuses every login because its limiter is down is worse than one that is
briefly unlimited; argon2's cost and the per-connection frame limit still hold.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.errors import RateLimited
from app.storage import Storage

log = logging.getLogger(__name__)

BUCKET_KEY = "ratelimit:{}:{}"

# KEYS: bucket. ARGV: rate per second, burst, cost. Returns {allowed, wait ms}.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: int

    @classmethod
    def per_minute(cls, count: float, burst: int) -> "Limit":
        return cls(count / 60.0, burst)


def take(storage: Storage, scope: str, ident, limit: Limit, what: str) -> None:
    """Take one token from the (scope, ident) bucket or raise RateLimited with a retry hint."""
    if limit.rate <= 0:
        return  # this limit is switched off
    try:
        allowed, wait_ms = storage.script(_TAKE)(keys=[BUCKET_KEY.format(scope, ident)],
                                                 args=[limit.rate, limit.burst, 1])
    except RedisError as exc:
        warn_unenforced(scope, exc)
        return
    if not allowed:
        raise RateLimited(f"too many {what}; retry in {max(0.1, wait_ms / 1000):.1f} s", retry_after_ms=int(wait_ms))


_last_warning: dict[str, float] = {}


def warn_unenforced(scope: str, exc: Exception, every: float = 30.0) -> None:
    """One warning per scope every 30 s while Redis is away, not one per request."""
    now = time.monotonic()
    if now - _last_warning.get(scope, -every) >= every:
        _last_warning[scope] = now
        log.warning("rate limit %s not enforced: Redis unavailable (%s)", scope, exc.__class__.__name__)


def limit_login(storage: Storage, remote_addr: str | None, username) -> None:
    """Login attempts per client address and per account (REST and the admin dashboard)."""
    settings = storage.settings
    limit = Limit.per_minute(settings.login_rate_per_minute, settings.login_burst)
    take(storage, "login-ip", remote_addr or "unknown", limit, "login attempts from this address")
    if isinstance(username, str):  # per account too: a distributed guess at one password is slowed as well
        take(storage, "login-user", username.strip().lower()[:64], limit, "login attempts for this account")


def limit_registration(storage: Storage, remote_addr: str | None) -> None:
    """Account creation per client address (each costs an argon2 hash)."""
    settings = storage.settings
    take(storage, "register-ip", remote_addr or "unknown",
         Limit.per_minute(settings.register_rate_per_minute, settings.register_burst),
         "registrations from this address")


class LocalBucket:
    """An in-process token bucket (one connection's frames: no Redis round trip per frame)."""

    def __init__(self, limit: Limit, clock=time.monotonic):
        self.limit, self.clock = limit, clock
        self.tokens, self.at = float(limit.burst), clock()

    def take(self) -> int:
        """0 if a token was taken, else the milliseconds until one is available."""
        now = self.clock()
        self.tokens = min(self.limit.burst, self.tokens + (now - self.at) * self.limit.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) * 1000 / self.limit.rate))
