"""Beat jobs on offline_messages: each idempotent and bounded per run (celeryconfig.beat_schedule)."""
from __future__ import annotations

from app.chat import maintenance
from app.chat.presence import sweep_presence as sweep_presence_entries
from app.push import admin as push_admin
from tasks import app
from tasks.batching import RETRY
from tasks.runtime import storage


@app.task(name="tasks.pipeline.purge_synced_offline_index", acks_late=True, **RETRY)
def purge_synced_offline_index() -> int:
    """Offline-index rows synced more than OFFLINE_INDEX_RETENTION_DAYS ago."""
    s = storage()
    return maintenance.purge_synced_offline_index(s, s.settings.offline_index_retention_days)


@app.task(name="tasks.pipeline.purge_push_log", acks_late=True, **RETRY)
def purge_push_log() -> int:
    """Finished push_log rows older than PUSH_LOG_RETENTION_DAYS."""
    s = storage()
    return push_admin.purge_push_log(s, s.settings.push_log_retention_days)


@app.task(name="tasks.pipeline.purge_sessions", acks_late=True, **RETRY)
def purge_sessions() -> int:
    """Expired refresh tokens and sessions no token of which can still be used."""
    from app.accounts.sessions import purge_sessions as purge

    return purge(storage())


@app.task(name="tasks.pipeline.reconcile_unread", acks_late=True, **RETRY)
def reconcile_unread() -> int:
    """Cached unread counters recounted from MySQL."""
    return maintenance.reconcile_unread(storage())


@app.task(name="tasks.pipeline.sweep_presence", acks_late=True, **RETRY)
def sweep_presence() -> int:
    """Presence entries of crashed gateways."""
    s = storage()
    return sweep_presence_entries(s.redis, s.settings.presence_ttl_seconds)



@app.task(name="tasks.pipeline.purge_unreferenced_media", acks_late=True, **RETRY)
def purge_unreferenced_media() -> int:
    """Uploads no message names, older than MEDIA_UNREFERENCED_HOURS (files and rows)."""
    from app.media.store import store_for
    from app.media.uploads import purge_unreferenced

    s = storage()
    return purge_unreferenced(s, store_for(s.settings), s.settings.media_unreferenced_hours)
