"""Chat housekeeping run by beat: bounded, idempotent batches (safe to run twice or concurrently)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from app.storage import Storage, purge_in_batches
from app.chat.unread import UNREAD_KEY, rebuild_unread
from models import OfflineMessageIndex

REBUILD_CHUNK = 500  # users recounted per snapshot


def purge_synced_offline_index(storage: Storage, older_than_days: int, max_batches: int = 50) -> int:
    """Drop offline-index rows that were synced long ago (the sync stream keeps the messages)."""
    cutoff = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=older_than_days)
    return purge_in_batches(storage, OfflineMessageIndex, OfflineMessageIndex.synced.is_(True),
                            OfflineMessageIndex.synced_at < cutoff, max_batches=max_batches)


def reconcile_unread(storage: Storage, max_users: int = 5000) -> int:
    """Recount the cached unread counters against MySQL (drift from crashes between steps)."""
    user_ids = []
    for key in storage.redis.scan_iter(match=UNREAD_KEY.format("*"), count=500):
        _, _, suffix = key.partition(":")
        if suffix.isdigit():  # unread:counted:*, unread:rebuilding:* are not counters
            user_ids.append(int(suffix))
            if len(user_ids) >= max_users:
                break
    for start in range(0, len(user_ids), REBUILD_CHUNK):
        rebuild_unread(storage, user_ids[start:start + REBUILD_CHUNK])
    return len(user_ids)
