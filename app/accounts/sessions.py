"""Login sessions: short access tokens, rotating refresh tokens, revocation, socket tickets.

A login opens a session (`auth_session`). Its access tokens (JWT, JWT_TTL_SECONDS) carry the
session id as `sid`; every REST request and every socket connect checks that the session is
not revoked. MySQL is the source of truth; Redis caches the answer for SESSION_CACHE_SECONDS
(`session:{sid}` = "ok" or "revoked"). A revocation writes "revoked" over the cache after its
commit, and a reader only ever adds a missing entry (SET NX), so a check that read MySQL just
before a revocation cannot write "ok" over it. After a Redis flush the cache is empty and the
next check reads MySQL again: a revoked session stays refused.

Refresh tokens are 256 random bits, stored as their sha256 (`auth_refresh`), used once: a
refresh marks the presented token used and issues the next one. A used token presented again
means two parties hold the session's tokens (one of them stole it): the whole session is
revoked, its access tokens stop working and its sockets are closed (OAuth 2.1 section 4.3.1).

Revoking closes the session's sockets on every gateway at once through their delivery
channels (the close envelope names the sessions, app.wire); each gateway also re-checks the
sessions of its sockets every ACCOUNT_CHECK_SECONDS (a close missed while Redis was away).
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import RedisError
from sqlalchemy import delete, insert, or_, select, update

from app.accounts.auth import authenticate, hash_password, issue_token, validate_credentials
from app.accounts.status import CLOSE_ACCOUNT_GONE, require_active
from app.chat.delivery import close_connections
from app.errors import Forbidden, Unauthorized
from app.storage import Storage
from models import AuthRefresh, AuthSession, User

log = logging.getLogger(__name__)

CACHE_KEY = "session:{}"
TICKET_KEY = "wsticket:{}"
WS_TICKET_SECONDS = 30  # DESIGN §10: a ticket opens one socket within 30 s
SESSION_ID_LENGTH = 32
# Why a session ended (auth_session.revoked_reason).
LOGOUT, LOGOUT_ALL, REFRESH_REUSED, PASSWORD_CHANGED = "logout", "logout_all", "refresh_reused", "password_changed"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionTokens:
    """What a login or a refresh answers."""

    user_id: int
    session_id: str
    access_token: str
    refresh_token: str
    expires_in: int  # the access token's lifetime, seconds


def _new_refresh(session, settings, session_id: str, now: int) -> str:
    token = secrets.token_urlsafe(32)
    session.add(AuthRefresh(token_hash=_digest(token), session_id=session_id, created_at_ms=now,
                            expires_at_ms=now + settings.refresh_ttl_seconds * 1000))
    return token


def start_session(storage: Storage, user_id: int, user_agent: str | None = None,
                  ip: str | None = None) -> SessionTokens:
    """A new login session of this (authenticated) user."""
    settings, now = storage.settings, _now_ms()
    session_id = uuid.uuid4().hex
    with storage.session() as session:
        session.add(AuthSession(id=session_id, user_id=user_id, created_at_ms=now, last_used_at_ms=now,
                                user_agent=(user_agent or "")[:255] or None, ip=(ip or "")[:64] or None))
        refresh = _new_refresh(session, settings, session_id, now)
    log.info("user %s: session %s opened", user_id, session_id)
    return SessionTokens(user_id, session_id, issue_token(settings, user_id, session_id), refresh, settings.jwt_ttl_seconds)


def refresh_session(storage: Storage, refresh_token) -> SessionTokens:
    """Rotate: the next access and refresh tokens for a valid refresh token (Unauthorized otherwise)."""
    if not isinstance(refresh_token, str) or not 20 <= len(refresh_token) <= 200:
        raise Unauthorized("invalid refresh token: log in again")
    settings, now = storage.settings, _now_ms()
    reused = None
    with storage.session() as session:
        row = session.scalar(select(AuthRefresh).where(AuthRefresh.token_hash == _digest(refresh_token))
                             .with_for_update())  # two refreshes of one token: the second sees it used
        if row is None:
            raise Unauthorized("invalid refresh token: log in again")
        auth = session.scalar(select(AuthSession).where(AuthSession.id == row.session_id).with_for_update())
        if auth is None or auth.revoked_at_ms is not None:
            raise Unauthorized("this session was ended: log in again")
        if row.used_at_ms is not None:
            reused = auth.user_id, auth.id  # revoked below, outside this transaction's refusal
        elif row.expires_at_ms <= now:
            raise Unauthorized("refresh token expired: log in again")
        else:
            require_active(session, auth.user_id)
            row.used_at_ms = now
            auth.last_used_at_ms = now
            refresh = _new_refresh(session, settings, auth.id, now)
            user_id, session_id = auth.user_id, auth.id
    if reused is not None:
        user_id, session_id = reused
        log.warning("user %s: session %s: a rotated refresh token was used again; session revoked",
                    user_id, session_id)
        revoke_sessions(storage, user_id, [session_id], REFRESH_REUSED)
        raise Unauthorized("refresh token already used: the session was ended for safety; log in again")
    return SessionTokens(user_id, session_id, issue_token(settings, user_id, session_id), refresh, settings.jwt_ttl_seconds)


def require_session(storage: Storage, user_id: int, session_id: str) -> None:
    """Unauthorized unless this session of this user is open (cached in Redis, MySQL decides)."""
    key = CACHE_KEY.format(session_id)
    ttl = storage.settings.session_cache_seconds
    cached = None
    if ttl:
        try:
            cached = storage.redis.get(key)
        except RedisError:  # MySQL answers alone
            cached = None
    if cached is not None:
        state = cached.decode() if isinstance(cached, bytes) else cached
        if state == f"ok:{user_id}":
            return
        raise Unauthorized("this session was ended (logged out): log in again")
    with storage.sessions() as session:
        auth = session.get(AuthSession, session_id)
        open_ = auth is not None and auth.user_id == user_id and auth.revoked_at_ms is None
    if ttl:
        try:  # NX: never over a revocation written meanwhile
            storage.redis.set(key, f"ok:{user_id}" if open_ else "revoked", ex=ttl, nx=True)
        except RedisError:
            pass
    if not open_:
        raise Unauthorized("this session was ended (logged out): log in again")


def open_sessions(storage: Storage, session_ids) -> set[str]:
    """Which of these sessions are still open (MySQL: a gateway's periodic re-check)."""
    ids = list(set(session_ids))
    if not ids:
        return set()
    with storage.sessions() as session:
        return set(session.scalars(select(AuthSession.id).where(AuthSession.id.in_(ids),
                                                                AuthSession.revoked_at_ms.is_(None))).all())


def revoke_sessions(storage: Storage, user_id: int, session_ids: list[str] | None, reason: str,
                    keep: str | None = None) -> list[str]:
    """Revoke these sessions of the user (None: all of them, but `keep`); their access tokens are
    refused from now on and their sockets closed. Returns the sessions revoked."""
    now = _now_ms()
    with storage.session() as session:
        query = select(AuthSession.id).where(AuthSession.user_id == user_id, AuthSession.revoked_at_ms.is_(None))
        if session_ids is not None:
            query = query.where(AuthSession.id.in_(session_ids))
        if keep is not None:
            query = query.where(AuthSession.id != keep)
        revoked = list(session.scalars(query.with_for_update()).all())
        if revoked:
            session.execute(update(AuthSession).where(AuthSession.id.in_(revoked))
                            .values(revoked_at_ms=now, revoked_reason=reason))
    if not revoked:
        return []
    try:
        pipe = storage.redis.pipeline(transaction=False)
        for sid in revoked:  # over any "ok" a reader cached: refused at once, not in SESSION_CACHE_SECONDS
            pipe.set(CACHE_KEY.format(sid), "revoked", ex=max(1, storage.settings.session_cache_seconds))
        pipe.execute()
        close_connections(storage, user_id, CLOSE_ACCOUNT_GONE, "session ended: log in again", sorted(revoked))
    except RedisError as exc:  # the cache was lost with Redis; the gateways' re-check closes the sockets
        log.warning("user %s: sessions revoked, Redis unavailable (%s): sockets close at the next re-check",
                    user_id, exc.__class__.__name__)
    log.info("user %s: %d session(s) revoked (%s)", user_id, len(revoked), reason)
    return revoked


def forget_sessions(storage: Storage, user_id: int) -> None:
    """A deleted account's sessions and refresh tokens go (its tokens were refused already)."""
    with storage.session() as session:
        ids = list(session.scalars(select(AuthSession.id).where(AuthSession.user_id == user_id)).all())
        if ids:
            session.execute(delete(AuthRefresh).where(AuthRefresh.session_id.in_(ids)))
            session.execute(delete(AuthSession).where(AuthSession.id.in_(ids)))


# --- socket tickets ---------------------------------------------------------------

def issue_ws_ticket(storage: Storage, user_id: int, session_id: str, token_expires_at: int) -> str:
    """A one-time ticket for `GET /ws?ticket=`: the socket it opens belongs to this session and
    lives no longer than the access token that asked for it."""
    ticket = secrets.token_urlsafe(32)
    storage.redis.set(TICKET_KEY.format(_digest(ticket)),
                      json.dumps({"user_id": user_id, "sid": session_id, "exp": token_expires_at}),
                      ex=WS_TICKET_SECONDS)
    return ticket


@dataclass(frozen=True)
class TicketClaims:
    user_id: int
    expires_at: int
    session_id: str


def redeem_ws_ticket(storage: Storage, ticket) -> TicketClaims:
    """The claims of an unused, unexpired ticket, which is gone from now on (GETDEL: one use)."""
    if not isinstance(ticket, str) or not 20 <= len(ticket) <= 200:
        raise Unauthorized("invalid ticket: ask POST /api/ws-ticket for a new one")
    raw = storage.redis.getdel(TICKET_KEY.format(_digest(ticket)))
    if raw is None:
        raise Unauthorized("ticket unknown, already used or expired: ask POST /api/ws-ticket for a new one")
    data = json.loads(raw)
    claims = TicketClaims(int(data["user_id"]), int(data["exp"]), str(data["sid"]))
    if claims.expires_at <= time.time():
        raise Unauthorized("the token that asked for this ticket has expired: refresh it and ask again")
    require_session(storage, claims.user_id, claims.session_id)
    return claims


# --- password change ----------------------------------------------------------------

def change_password(storage: Storage, user_id: int, session_id: str, old_password: str, new_password) -> int:
    """Set a new password (the old one confirms it) and end the user's other sessions; returns how
    many were ended. Forbidden for a wrong old password, InvalidInput for a weak new one."""
    settings = storage.settings
    with storage.session() as session:
        user = session.scalar(select(User).where(User.id == user_id).with_for_update())
        if user is None or user.deleted_at is not None:
            raise Unauthorized("invalid token: the account does not exist")
        validate_credentials(user.username, new_password)  # the registration rules
        try:
            authenticate(session, settings, user.username, old_password)
        except Unauthorized:
            raise Forbidden("wrong current password: the password was not changed") from None
        user.password_hash = hash_password(settings, new_password)
    ended = revoke_sessions(storage, user_id, None, PASSWORD_CHANGED, keep=session_id)
    log.info("user %s changed their password; %d other session(s) ended", user_id, len(ended))
    return len(ended)


def bulk_access_tokens(storage: Storage, settings, user_ids: list[int]) -> list[str]:
    """An access token of a new session (without a refresh token) for each user: for benches and
    tools that make thousands of users at once."""
    now = _now_ms()
    sids = [uuid.uuid4().hex for _ in user_ids]
    with storage.session() as session:
        for start in range(0, len(user_ids), 5000):
            session.execute(insert(AuthSession), [
                {"id": sid, "user_id": uid, "created_at_ms": now, "last_used_at_ms": now}
                for uid, sid in zip(user_ids[start:start + 5000], sids[start:start + 5000])])
    return [issue_token(settings, uid, sid) for uid, sid in zip(user_ids, sids)]


def purge_sessions(storage: Storage, max_batches: int = 50, batch: int = 1000, now_ms: int | None = None) -> int:
    """Beat housekeeping: expired refresh tokens, and sessions that can no longer be used (ended, or
    idle past REFRESH_TTL_SECONDS + JWT_TTL_SECONDS: every token of theirs has expired). Bounded per
    run, idempotent; returns the rows removed."""
    settings = storage.settings
    now = _now_ms() if now_ms is None else now_ms
    cutoff = now - (settings.refresh_ttl_seconds + settings.jwt_ttl_seconds) * 1000
    removed = 0
    for _ in range(max_batches):  # sessions first: with them go their refresh rows, expired or not
        with storage.session() as session:
            ids = list(session.scalars(select(AuthSession.id).where(or_(
                AuthSession.revoked_at_ms < cutoff,
                AuthSession.revoked_at_ms.is_(None) & (AuthSession.last_used_at_ms < cutoff)))
                .order_by(AuthSession.id).limit(batch)).all())
            if ids:
                removed += session.execute(delete(AuthRefresh).where(AuthRefresh.session_id.in_(ids))).rowcount
                removed += session.execute(delete(AuthSession).where(AuthSession.id.in_(ids))).rowcount
        if len(ids) < batch:
            break
    for _ in range(max_batches):  # a used token stays until it expires: its reuse must still be caught
        with storage.session() as session:
            hashes = list(session.scalars(select(AuthRefresh.token_hash).where(AuthRefresh.expires_at_ms < now)
                                          .order_by(AuthRefresh.token_hash).limit(batch)).all())
            if hashes:
                removed += session.execute(delete(AuthRefresh).where(AuthRefresh.token_hash.in_(hashes))).rowcount
        if len(hashes) < batch:
            break
    return removed
