"""Admin view of push_log: who may see it, list with filters, retry one or many from the stored
payload, and its retention (run by beat)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, update

from app.errors import Conflict, InvalidInput, NotFound
from app.push.planning import FAILED, PENDING, SKIPPED, SUCCESS
from app.storage import Storage, purge_in_batches
from models import PushLog, User

STATUSES = (PENDING, SUCCESS, FAILED, SKIPPED)
PROVIDERS = ("apns", "fcm", "email", "webpush")
RETRYABLE = (FAILED, SKIPPED)
MAX_PER_PAGE = 200


def is_admin(storage: Storage, user_id: int) -> bool:
    """Whether this account exists and has the admin role (checked on every request: a demoted
    admin's token or cookie stops working at once)."""
    with storage.sessions() as session:
        user = session.get(User, user_id)
    return user is not None and user.is_admin


@dataclass(frozen=True)
class PushFilter:
    status: str | None = None
    user_id: int | None = None
    provider: str | None = None

    @classmethod
    def parse(cls, status=None, user_id=None, provider=None) -> "PushFilter":
        status, provider = status or None, provider or None
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"'status' must be one of {', '.join(STATUSES)}")
        if provider is not None and provider not in PROVIDERS:
            raise InvalidInput(f"'provider' must be one of {', '.join(PROVIDERS)}")
        if user_id in (None, ""):
            uid = None
        elif (isinstance(user_id, int) and not isinstance(user_id, bool)) or (
                isinstance(user_id, str) and user_id.isascii() and user_id.isdigit() and len(user_id) <= 19):
            uid = int(user_id)
        else:
            raise InvalidInput("'user_id' must be a user id")
        return cls(status, uid, provider)

    def apply(self, query):
        if self.status:
            query = query.where(PushLog.push_status == self.status)
        if self.user_id is not None:
            query = query.where(PushLog.user_id == self.user_id)
        if self.provider:
            query = query.where(PushLog.push_type == self.provider)
        return query


def push_view(row: PushLog) -> dict:
    return {"id": str(row.id), "user_id": str(row.user_id), "msg_id": str(row.message_id),
            "provider": row.push_type, "status": row.push_status, "target": row.target, "priority": row.priority,
            "attempts": row.attempts, "error": row.error_msg, "provider_id": row.provider_id,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None,
            "pushed_at": row.push_time.isoformat() if row.push_time else None}


def list_pushes(storage: Storage, flt: PushFilter, page: int = 1, per_page: int = 50) -> dict:
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidInput(f"'page' must be ≥ 1 and 'per_page' 1-{MAX_PER_PAGE}")
    with storage.sessions() as session:
        total = session.scalar(flt.apply(select(func.count()).select_from(PushLog)))
        rows = session.scalars(flt.apply(select(PushLog)).order_by(PushLog.id.desc())
                               .offset((page - 1) * per_page).limit(per_page)).all()
    return {"pushes": [push_view(r) for r in rows], "page": page, "per_page": per_page, "total": total}


def reopen_push(storage: Storage, push_id: int) -> int:
    """Make a failed (or skipped) push pending again; the caller enqueues its delivery."""
    with storage.session() as session:
        row = session.get(PushLog, push_id, with_for_update=True)
        if row is None:
            raise NotFound(f"push {push_id} does not exist")
        if row.push_status not in RETRYABLE:
            raise Conflict(f"push {push_id} is {row.push_status}; only failed or skipped pushes are retried")
        row.push_status, row.attempts, row.error_msg = PENDING, 0, "retry requested by an admin"
        return row.priority


def reopen_matching(storage: Storage, flt: PushFilter, limit: int = 10_000) -> list[tuple[int, int]]:
    """Reopen every retryable push matching the filter (failed ones unless a status is given)."""
    status = flt.status or FAILED
    if status not in RETRYABLE:
        raise InvalidInput("only failed or skipped pushes can be retried")
    flt = PushFilter(status, flt.user_id, flt.provider)
    with storage.session() as session:
        rows = session.execute(flt.apply(select(PushLog.id, PushLog.priority)).order_by(PushLog.id)
                               .limit(limit).with_for_update()).all()
        if rows:
            session.execute(update(PushLog).where(PushLog.id.in_([r.id for r in rows]))
                            .values(push_status=PENDING, attempts=0, error_msg="retry requested by an admin"))
    return [(r.id, r.priority) for r in rows]


def fail_reopened(storage: Storage, push_id: int, reason: str) -> None:
    """Undo a reopen whose delivery could not be queued, so it can be retried again."""
    with storage.session() as session:
        session.execute(update(PushLog).where(PushLog.id == push_id, PushLog.push_status == PENDING,
                                              PushLog.attempts == 0).values(push_status=FAILED, error_msg=reason))


def purge_push_log(storage: Storage, older_than_days: int, max_batches: int = 50) -> int:
    """Drop finished push_log rows past their retention (pending rows are kept: they still run)."""
    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=older_than_days)
    return purge_in_batches(storage, PushLog, PushLog.push_status != PENDING, PushLog.created_at < cutoff,
                            max_batches=max_batches)
