"""Sessions on their own (app.accounts.sessions, app.accounts.lockout): rotation, reuse, revocation
and its cache, tickets, the lockout's growing delay, housekeeping."""
import time

import pytest
from sqlalchemy import func, select

from app.accounts import lockout, sessions
from app.accounts.auth import verify_token
from app.errors import RateLimited, Unauthorized
from models import AuthRefresh, AuthSession


def test_a_refresh_rotates_and_a_reused_token_ends_the_session(storage, make_user):
    uid = make_user()
    first = sessions.start_session(storage, uid, "test-agent", "127.0.0.1")
    assert verify_token(storage.settings, first.access_token).session_id == first.session_id
    second = sessions.refresh_session(storage, first.refresh_token)
    assert second.session_id == first.session_id and second.refresh_token != first.refresh_token
    sessions.require_session(storage, uid, first.session_id)
    with pytest.raises(Unauthorized, match="already used"):
        sessions.refresh_session(storage, first.refresh_token)
    with pytest.raises(Unauthorized, match="session was ended"):
        sessions.refresh_session(storage, second.refresh_token)
    with pytest.raises(Unauthorized, match="session was ended"):
        sessions.require_session(storage, uid, first.session_id)
    with storage.sessions() as session:
        assert session.get(AuthSession, first.session_id).revoked_reason == sessions.REFRESH_REUSED
        stored = set(session.scalars(select(AuthRefresh.token_hash)))
    assert first.refresh_token not in stored and second.refresh_token not in stored  # hashes only


def test_a_revocation_overrides_the_cache_and_a_flushed_cache_asks_mysql(storage, make_user):
    uid = make_user()
    mine = sessions.start_session(storage, uid)
    other = sessions.start_session(storage, uid)
    sessions.require_session(storage, uid, mine.session_id)  # cached "ok"
    assert sessions.revoke_sessions(storage, uid, None, sessions.PASSWORD_CHANGED, keep=mine.session_id) == [
        other.session_id]
    with pytest.raises(Unauthorized):
        sessions.require_session(storage, uid, other.session_id)
    storage.redis.delete(sessions.CACHE_KEY.format(other.session_id))
    with pytest.raises(Unauthorized):  # from MySQL
        sessions.require_session(storage, uid, other.session_id)
    sessions.require_session(storage, uid, mine.session_id)
    with pytest.raises(Unauthorized):  # a session is its user's only
        sessions.require_session(storage, make_user(), mine.session_id)


def test_a_ticket_works_once(storage, make_user):
    uid = make_user()
    tokens = sessions.start_session(storage, uid)
    ticket = sessions.issue_ws_ticket(storage, uid, tokens.session_id, int(time.time()) + 60)
    claims = sessions.redeem_ws_ticket(storage, ticket)
    assert (claims.user_id, claims.session_id) == (uid, tokens.session_id)
    with pytest.raises(Unauthorized, match="already used"):
        sessions.redeem_ws_ticket(storage, ticket)


def test_the_lockout_doubles_its_delay_and_a_success_clears_it(storage, make_user):
    make_user("locky")
    for _ in range(storage.settings.login_lockout_threshold - 1):
        with pytest.raises(Unauthorized):
            lockout.authenticate_guarded(storage, "locky", "wrong-password")
    lockout.check_lockout(storage, "LOCKY")  # not yet locked
    delays = []
    for _ in range(3):
        storage.redis.hdel(lockout.LOCK_KEY.format("locky"), "until")  # the previous lock has passed
        with pytest.raises(Unauthorized):
            lockout.authenticate_guarded(storage, "locky", "wrong-password")
        with pytest.raises(RateLimited) as locked:
            lockout.authenticate_guarded(storage, "Locky", "correct-horse")  # the name is case-insensitive
        delays.append(locked.value.retry_after_ms)
    base = storage.settings.login_lockout_base_seconds * 1000
    assert [round(d / base) for d in delays] == [1, 2, 4]
    storage.redis.hdel(lockout.LOCK_KEY.format("locky"), "until")
    assert lockout.authenticate_guarded(storage, "locky", "correct-horse").username == "locky"
    assert not storage.redis.exists(lockout.LOCK_KEY.format("locky"))


def test_housekeeping_drops_what_can_no_longer_be_used_and_keeps_what_can(storage, make_user):
    uid = make_user()
    live = sessions.start_session(storage, uid)
    rotated = sessions.refresh_session(storage, live.refresh_token)  # the used row stays to catch a reuse
    ended = sessions.start_session(storage, uid)
    sessions.revoke_sessions(storage, uid, [ended.session_id], sessions.LOGOUT)
    assert sessions.purge_sessions(storage) == 0
    later = int(time.time() * 1000) + (storage.settings.refresh_ttl_seconds + storage.settings.jwt_ttl_seconds
                                       + 60) * 1000
    assert sessions.purge_sessions(storage, now_ms=later) == 5  # both sessions, their three refresh rows
    with storage.sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuthSession)) == 0
    assert rotated.session_id == live.session_id
