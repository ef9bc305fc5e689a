"""Accounts and tokens (app.accounts.auth, app.accounts.status): registration, login, token expiry."""
import time

import jwt
import pytest

from app.accounts.auth import JWT_LEEWAY_SECONDS, authenticate, issue_token, register_user, verify_token
from app.accounts.status import require_active, set_disabled
from app.errors import Conflict, InvalidInput, Unauthorized


def _register(storage, username, password="correct-horse"):
    with storage.session() as session:
        return register_user(session, storage.settings, username, password)


def _login(storage, username, password):
    with storage.session() as session:
        return authenticate(session, storage.settings, username, password).id


def test_a_registered_user_logs_in_and_a_taken_name_is_refused(storage):
    user_id = _register(storage, "alice")
    assert _login(storage, "alice", "correct-horse") == user_id
    with pytest.raises(Conflict, match="'alice' is already taken"):
        _register(storage, "alice", "another-password")


@pytest.mark.parametrize("username, password, why", [
    ("al", "correct-horse", "username must be 3-32"), ("a" * 33, "correct-horse", "username"),
    ("bob smith", "correct-horse", "username"), ("bob", "short", "password must be"),
    ("bob", "x" * 257, "password must be"), (None, "correct-horse", "username"), ("bob", 12345678, "password"),
])
def test_bad_credentials_at_registration_say_what_is_wrong(storage, username, password, why):
    with pytest.raises(InvalidInput, match=why):
        _register(storage, username, password)


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(storage):
    _register(storage, "carol")
    with pytest.raises(Unauthorized) as wrong:
        _login(storage, "carol", "not-her-password")
    with pytest.raises(Unauthorized) as unknown:
        _login(storage, "nobody-here", "correct-horse")
    assert str(wrong.value) == str(unknown.value) == "wrong username or password"


def test_a_disabled_account_cannot_log_in_or_use_its_tokens_until_enabled_again(storage):
    user_id = _register(storage, "dave")
    set_disabled(storage, "dave", True)
    with pytest.raises(Unauthorized, match="disabled"):
        _login(storage, "dave", "correct-horse")
    with storage.sessions() as session, pytest.raises(Unauthorized, match="disabled"):
        require_active(session, user_id)  # what REST and connect check after the token
    set_disabled(storage, "dave", False)
    assert _login(storage, "dave", "correct-horse") == user_id


def test_a_token_names_its_user_and_expires_a_ttl_after_it_was_issued(storage, clock):
    token = issue_token(storage.settings, 42, "s42", now=clock())
    claims = verify_token(storage.settings, token)
    assert (claims.user_id, claims.expires_at, claims.session_id) == (
        42, int(clock()) + storage.settings.jwt_ttl_seconds, "s42")


def test_a_token_past_its_ttl_is_refused_after_the_leeway_for_clock_skew(storage, clock):
    # The issuing server's clock is set back: the token was made that long ago.
    ttl = storage.settings.jwt_ttl_seconds
    clock.now = time.time() - ttl - JWT_LEEWAY_SECONDS // 2
    assert verify_token(storage.settings, issue_token(storage.settings, 7, "s7", now=clock())).user_id == 7
    clock.advance(-JWT_LEEWAY_SECONDS)
    with pytest.raises(Unauthorized, match="token expired: log in again"):
        verify_token(storage.settings, issue_token(storage.settings, 7, "s7", now=clock()))


@pytest.mark.parametrize("forge", [
    lambda s, now: jwt.encode({"sub": "7", "iat": now, "exp": now + 60}, "some-other-secret-0123456789abcdef",
                              algorithm="HS256"),
    lambda s, now: jwt.encode({"sub": "7", "iat": now, "exp": now + 60}, None, algorithm="none"),
    lambda s, now: jwt.encode({"sub": "7", "iat": now}, s.jwt_secret, algorithm="HS256"),  # no expiry
    lambda s, now: jwt.encode({"sub": "seven", "sid": "s7", "iat": now, "exp": now + 60}, s.jwt_secret, algorithm="HS256"),
    lambda s, now: issue_token(s, 7, "s7", now=now)[:-4] + "AAAA",  # signature tampered with
    lambda s, now: "not.a.token",
])
def test_a_forged_or_malformed_token_is_refused(storage, clock, forge):
    with pytest.raises(Unauthorized, match="invalid token"):
        verify_token(storage.settings, forge(storage.settings, int(clock())))


def test_a_token_without_a_session_is_refused(storage, clock):
    now = int(clock())  # as issued before sessions existed: it could not be revoked
    old = jwt.encode({"sub": "7", "iat": now, "exp": now + 60}, storage.settings.jwt_secret, algorithm="HS256")
    with pytest.raises(Unauthorized, match="without a session"):
        verify_token(storage.settings, old)


def test_no_token_at_all_says_so(storage):
    for missing in (None, ""):
        with pytest.raises(Unauthorized, match="missing token"):
            verify_token(storage.settings, missing)
