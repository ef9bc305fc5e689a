"""Accounts an operator disables (or that were deleted): no login, no token, no socket.

A disabled account's tokens stop working at once on REST and at connect; its
open sockets are closed with 4401 at once through their gateways' delivery
channels, and every gateway also re-checks its connected accounts every
ACCOUNT_CHECK_SECONDS (which catches deleted rows and a missed close).
"""
from __future__ import annotations

import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import NotFound, Unauthorized
from app.chat.delivery import close_connections
from app.storage import Storage
from models import User

CLOSE_ACCOUNT_GONE = 4401


def require_active(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.deleted_at is not None:
        raise Unauthorized("invalid token: the account does not exist")
    if user.disabled_at is not None:
        raise Unauthorized("this account is disabled: contact the operator")
    return user


def active_among(storage: Storage, user_ids) -> set[int]:
    ids = list(set(user_ids))
    if not ids:
        return set()
    with storage.sessions() as session:
        return set(session.scalars(select(User.id).where(User.id.in_(ids), User.disabled_at.is_(None))).all())


def set_disabled(storage: Storage, username: str, disabled: bool) -> int:
    """Disable (and cut off) or re-enable an account; returns its id."""
    with storage.session() as session:
        user_id = session.scalar(select(User.id).where(User.username == username))
        if user_id is None:
            raise NotFound(f"no user named {username!r}")
        session.execute(update(User).where(User.id == user_id)
                        .values(disabled_at=int(time.time() * 1000) if disabled else None))
    if disabled:
        cut_off(storage, user_id)
    return user_id


def cut_off(storage: Storage, user_id: int, reason: str = "account disabled: contact the operator") -> int:
    """Close every open socket of the account, wherever it is; returns how many were asked to close."""
    return close_connections(storage, user_id, CLOSE_ACCOUNT_GONE, reason)
