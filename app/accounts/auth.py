"""Accounts and tokens: registration, password check, JWT issue and verify."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, InvalidInput, Unauthorized
from models import User

JWT_ALGORITHM = "HS256"  # pinned: a token naming any other algorithm (or "none") is refused
JWT_LEEWAY_SECONDS = 10  # clock skew between the issuing and the checking server
USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")
MIN_PASSWORD, MAX_PASSWORD = 8, 256

_HASHERS = {
    "default": PasswordHasher(),  # argon2id, RFC 9106 low-memory profile
    # Tests register hundreds of users; this profile is refused in production.
    "fast": PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
}
# Verifying an unknown user still costs one hash, so timing does not reveal which usernames exist.
_DUMMY_HASH = _HASHERS["default"].hash("not-a-real-password")


def _hasher(settings: Settings) -> PasswordHasher:
    return _HASHERS.get(settings.password_hash_profile, _HASHERS["default"])


def validate_credentials(username, password) -> tuple[str, str]:
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise InvalidInput("username must be 3-32 characters of letters, digits, '_', '.' or '-'")
    if not isinstance(password, str) or not (MIN_PASSWORD <= len(password) <= MAX_PASSWORD):
        raise InvalidInput(f"password must be a string of {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return username, password


def hash_password(settings: Settings, password: str) -> str:
    return _hasher(settings).hash(password)


def register_user(session: Session, settings: Settings, username, password) -> int:
    """Create an account; raises Conflict if the username is taken."""
    username, password = validate_credentials(username, password)
    if _reserved(session, username):
        raise Conflict(f"username {username!r} is already taken")
    user = User(username=username, password_hash=_hasher(settings).hash(password))
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"username {username!r} is already taken") from None
    return user.id


def _reserved(session: Session, username: str) -> bool:
    """A deleted account holds its username for USERNAME_REUSE_DAYS (app.accounts.deletion)."""
    from app.accounts.deletion import reserved_username

    return reserved_username(session, username)


def authenticate(session: Session, settings: Settings, username: str, password: str) -> User:
    """Return the user whose credentials these are, or raise Unauthorized."""
    user = session.scalar(select(User).where(User.username == username))
    hasher = _hasher(settings)
    try:
        hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        raise Unauthorized("wrong username or password") from None
    if user is None:
        raise Unauthorized("wrong username or password")
    if user.disabled_at is not None:  # told only to whoever knows the password
        raise Unauthorized("this account is disabled: contact the operator")
    return user


def issue_token(settings: Settings, user_id: int, session_id: str, now: float | None = None) -> str:
    """An access token of this login session (app.accounts.sessions checks `sid` on every use)."""
    now = int(time.time() if now is None else now)
    claims = {"sub": str(user_id), "sid": session_id, "iat": now, "exp": now + settings.jwt_ttl_seconds}
    return jwt.encode(claims, settings.jwt_secret, algorithm=JWT_ALGORITHM)


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    expires_at: int  # seconds since the epoch
    session_id: str = ""  # the login session (app.accounts.sessions)


def verify_token(settings: Settings, token: str | None) -> TokenClaims:
    """The claims of a valid token; Unauthorized for anything else."""
    if not token:
        raise Unauthorized("missing token")
    try:
        claims = jwt.decode(
            token, settings.jwt_secret, algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "iat", "sub"]}, leeway=JWT_LEEWAY_SECONDS,
        )
        sid = claims.get("sid")
        if not isinstance(sid, str) or not sid:
            # Issued before sessions existed (a 24-hour token): it cannot be revoked, so it is refused.
            raise Unauthorized("token without a session (issued by an older server): log in again")
        return TokenClaims(int(claims["sub"]), int(claims["exp"]), sid)
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired: log in again") from None
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise Unauthorized("invalid token") from None
