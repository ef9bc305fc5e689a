"""Per-username login lockout with an exponential delay (on top of the per-IP and per-name rate
limits of app.ratelimit).

After LOGIN_LOCKOUT_THRESHOLD failed logins in a row for one username (existing or not: the
answer must not tell which names exist), each further failure locks the name for BASE, 2×BASE,
4×BASE … seconds, at most LOGIN_LOCKOUT_MAX_SECONDS; while locked, a login is answered 429 with
Retry-After and the password is not even checked (no guess is tried). A success clears the
count; the count is forgotten LOGIN_LOCKOUT_RESET_SECONDS after the last failure.

The trade-off (docs/security.md): an attacker who knows a username can keep it locked by
failing once per delay, but never for more than LOGIN_LOCKOUT_MAX_SECONDS at a stretch, and
the lock only stops password logins: the owner's signed-in devices keep refreshing their
sessions (and can change the password). The state lives in Redis; a Redis loss forgets it.
"""
from __future__ import annotations

import time

from redis.exceptions import RedisError

from app.accounts.auth import authenticate
from app.errors import RateLimited, Unauthorized
from app.ratelimit import warn_unenforced
from app.storage import Storage

LOCK_KEY = "lockout:{}"

# KEYS[1] the name's hash; ARGV now_ms, threshold, base_ms, max_ms, reset_s. Returns the lock in ms (0: none).
_FAIL = """
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local lock_ms = 0
if fails >= tonumber(ARGV[2]) then
  lock_ms = math.floor(math.min(tonumber(ARGV[3]) * 2 ^ math.min(fails - tonumber(ARGV[2]), 40), tonumber(ARGV[4])))
  redis.call('HSET', KEYS[1], 'until', tonumber(ARGV[1]) + lock_ms)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]) + math.ceil(lock_ms / 1000))
return lock_ms
"""


def _key(username: str) -> str:
    return LOCK_KEY.format(username.strip().lower()[:64])  # the database compares names case-insensitively


def check_lockout(storage: Storage, username: str) -> None:
    """RateLimited (429, Retry-After) while this username is locked."""
    if storage.settings.login_lockout_threshold <= 0:
        return
    try:
        until = storage.redis.hget(_key(username), "until")
    except RedisError as exc:
        warn_unenforced("login-lockout", exc)
        return
    wait_ms = int(until) - int(time.time() * 1000) if until is not None else 0
    if wait_ms > 0:
        raise RateLimited(f"too many failed logins for this account; retry in {max(1, -(-wait_ms // 1000))} s",
                          retry_after_ms=wait_ms)


def record_failure(storage: Storage, username: str) -> None:
    settings = storage.settings
    if settings.login_lockout_threshold <= 0:
        return
    try:
        storage.script(_FAIL)(keys=[_key(username)], args=[
            int(time.time() * 1000), settings.login_lockout_threshold,
            int(settings.login_lockout_base_seconds * 1000), int(settings.login_lockout_max_seconds * 1000),
            settings.login_lockout_reset_seconds])
    except RedisError as exc:
        warn_unenforced("login-lockout", exc)


def clear_lockout(storage: Storage, username: str) -> None:
    """A successful login (or the operator) ends the lock and the count."""
    try:
        storage.redis.delete(_key(username))
    except RedisError as exc:
        warn_unenforced("login-lockout", exc)


def authenticate_guarded(storage: Storage, username: str, password: str):
    """app.accounts.auth.authenticate behind the lockout: the user, or Unauthorized / RateLimited."""
    check_lockout(storage, username)
    try:
        with storage.sessions() as session:
            user = authenticate(session, storage.settings, username, password)
    except Unauthorized:
        record_failure(storage, username)
        raise
    clear_lockout(storage, username)
    return user
