"""Finding users (the lookup behind "start a chat with <username>") and the operator's account commands."""
from __future__ import annotations

from typing import Callable

from sqlalchemy import select

from app.accounts.auth import USERNAME_RE, register_user
from app.config import Settings
from app.errors import InvalidInput, NotFound
from app.storage import Storage
from models import DELETED_USER_NAME, User


def find_user_by_username(storage: Storage, username) -> dict:
    """{"user_id", "username"} of the account with this username (as the database
    compares names: case-insensitively on MySQL); NotFound if there is none."""
    if not isinstance(username, str) or username == "":
        raise InvalidInput("query parameter 'username' is required")
    if not USERNAME_RE.fullmatch(username):
        raise InvalidInput("username must be 3-32 characters of letters, digits, '_', '.' or '-'")
    with storage.sessions() as session:
        user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user named {username!r}")
    return {"user_id": str(user.id), "username": user.username}


USERS_BY_PREFIX_LIMIT = 20


def users_by_prefix(storage: Storage, asker_id: int, prefix: str) -> list[dict]:
    """Up to 20 {"user_id", "username"} whose username starts with `prefix` (as the database
    compares names: case-insensitively on MySQL), alphabetical; not the asker, not disabled
    accounts. `prefix` is checked at the boundary (letters, digits, '_', '.', '-')."""
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    with storage.read_sessions() as session:
        rows = session.execute(select(User.id, User.username).where(
            User.username.like(pattern, escape="\\"), User.id != asker_id, User.disabled_at.is_(None),
        ).order_by(User.username).limit(USERS_BY_PREFIX_LIMIT)).all()
    return [{"user_id": str(uid), "username": name} for uid, name in rows]


def user_by_id(storage: Storage, user_id: int) -> dict:
    """{"user_id", "username"}: names for senders and readers a client does not know (former members too)."""
    with storage.sessions() as session:
        user = session.get(User, user_id) if 0 < user_id < 2**63 else None
    if user is None:
        raise NotFound(f"user {user_id} does not exist")
    if user.deleted_at is not None:  # their messages stay with the other parties, under this name
        return {"user_id": str(user.id), "username": DELETED_USER_NAME, "deleted": True}
    return {"user_id": str(user.id), "username": user.username}


def make_admin(storage: Storage, settings: Settings, username: str, new_password: Callable[[], str]) -> int:
    """Give this account the admin role, creating it (with the password `new_password()` asks
    for) when there is none; returns its id."""
    with storage.session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            user = session.get(User, register_user(session, settings, username, new_password()))
        user.is_admin = True
        return user.id


def all_user_ids(storage: Storage) -> list[int]:
    with storage.sessions() as session:
        return list(session.scalars(select(User.id).order_by(User.id)).all())
