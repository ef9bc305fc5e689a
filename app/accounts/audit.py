"""The audit log: every administrative action, and account deletions, with who, what and when.

Entries carry ids and outcomes, never message content, passwords, tokens or push payloads.
An entry is written in the same transaction as the change when the change is one
(`record_in`), right after it otherwise (`record`).
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import func, select

from app.storage import Storage
from models import AuditEntry, User

log = logging.getLogger(__name__)

ACTOR_ADMIN, ACTOR_OPERATOR, ACTOR_USER = "admin", "operator", "user"  # operator: the CLI, no account
USER_DISABLED, USER_ENABLED, USER_DELETED = "user.disabled", "user.enabled", "user.deleted"
PUSH_RETRIED, PUSHES_RETRIED, MESSAGE_REMOVED = "push.retried", "pushes.retried", "message.removed"


def record_in(session, actor_id: int | None, actor: str, action: str, target_type: str, target_id,
              detail: dict | None = None) -> None:
    """Add an audit entry to the caller's transaction."""
    session.add(AuditEntry(at_ms=int(time.time() * 1000), actor_id=actor_id, actor=actor, action=action,
                           target_type=target_type, target_id=str(target_id), detail=detail or None))


def record(storage: Storage, actor_id: int | None, actor: str, action: str, target_type: str, target_id,
           detail: dict | None = None) -> None:
    """An audit entry in its own transaction (after a change made elsewhere)."""
    with storage.session() as session:
        record_in(session, actor_id, actor, action, target_type, target_id, detail)
    log.info("audit: %s %s %s %s %s", actor, actor_id, action, target_type, target_id)


def list_audit(storage: Storage, page: int, per_page: int, action: str | None = None) -> dict:
    """A page of the audit log, newest first, with the acting admin's username."""
    conditions = [AuditEntry.action == action] if action else []
    with storage.sessions() as session:
        total = session.scalar(select(func.count()).select_from(AuditEntry).where(*conditions))
        rows = session.execute(select(AuditEntry, User.username).outerjoin(User, User.id == AuditEntry.actor_id)
                               .where(*conditions).order_by(AuditEntry.at_ms.desc(), AuditEntry.id.desc())
                               .offset((page - 1) * per_page).limit(per_page)).all()
    return {"entries": [{
        "id": str(entry.id), "at": entry.at_ms, "actor": entry.actor,
        "actor_id": str(entry.actor_id) if entry.actor_id is not None else None, "actor_name": username,
        "action": entry.action, "target_type": entry.target_type, "target_id": entry.target_id,
        "detail": entry.detail or {},
    } for entry, username in rows], "page": page, "per_page": per_page, "total": total}
