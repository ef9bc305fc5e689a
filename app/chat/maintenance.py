"""Housekeeping run by beat: bounded, idempotent batches (safe to run twice or concurrently)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select

from app.storage import Storage
from app.chat.unread import UNREAD_KEY, rebuild_unread
from models import OfflineMessageIndex, PushLog

BATCH = 1000


def _purge(storage: Storage, model, *conditions, max_batches: int) -> int:
    removed = 0
    for _ in range(max_batches):
        with storage.session() as session:
            ids = session.scalars(select(model.id).where(*conditions).order_by(model.id).limit(BATCH)).all()
            if ids:
                session.execute(delete(model).where(model.id.in_(ids)))
        removed += len(ids)
        if len(ids) < BATCH:
            break
    return removed


def purge_synced_offline_index(storage: Storage, older_than_days: int, max_batches: int = 50) -> int:
    """Drop offline-index rows that were synced long ago (the sync stream keeps the messages)."""
    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=older_than_days)
    return _purge(storage, OfflineMessageIndex, OfflineMessageIndex.synced.is_(True),
                  OfflineMessageIndex.synced_at < cutoff, max_batches=max_batches)


def purge_push_log(storage: Storage, older_than_days: int, max_batches: int = 50) -> int:
    """Drop finished push_log rows past their retention (pending rows are kept: they still run)."""
    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=older_than_days)
    return _purge(storage, PushLog, PushLog.push_status != "pending", PushLog.created_at < cutoff,
                  max_batches=max_batches)


def reconcile_unread(storage: Storage, max_users: int = 5000) -> int:
    """Recount the cached unread counters against MySQL (drift from crashes between steps)."""
    done = 0
    for key in storage.redis.scan_iter(match=UNREAD_KEY.format("*"), count=500):
        _, _, suffix = key.partition(":")
        if not suffix.isdigit():  # unread:counted:*, unread:rebuilding:* are not counters
            continue
        rebuild_unread(storage, int(suffix))
        done += 1
        if done >= max_users:
            break
    return done
