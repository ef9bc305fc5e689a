"""Celery tasks: thin adapters from queue messages to app.messaging.

Each task takes primitive ids (persist takes the accepted message itself,
which exists nowhere else yet), is idempotent, declares its retry policy, and
enqueues the next step only after its own commit.
"""
from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.errors import Unavailable
from app.messaging import dispatch_private_message, persist_private_message
from app.presence import sweep_presence as sweep_presence_entries
from app.push import PRIORITY_PRIVATE, record_pending_pushes
from app.storage import Storage
from tasks import app

log = logging.getLogger(__name__)

# Transient trouble (database, Redis or broker away): retry with capped
# exponential backoff and jitter, for as long as it takes. Never drop.
TRANSIENT = (DBAPIError, RedisError, BrokerError, ConnectionError, TimeoutError)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=1, retry_backoff_max=30, retry_jitter=True, max_retries=None)

# The gateway gives up quickly so the sender gets an error frame, not silence.
GATEWAY_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}

_storage: Storage | None = None
_storage_pid: int | None = None


def storage() -> Storage:
    """This process's Storage (made after fork: connections are not shared)."""
    global _storage, _storage_pid
    if _storage is None or _storage_pid != os.getpid():
        _storage, _storage_pid = Storage(Settings.from_env()), os.getpid()
    return _storage


@worker_process_init.connect
def _fresh_connections(**_):
    global _storage
    _storage = None


@app.task(bind=True, acks_late=True, **RETRY)
def persist_message(self, message: dict) -> dict:
    """Store an accepted private message, then hand it to dispatch."""
    outcome = persist_private_message(storage(), message)
    if outcome.dispatch:
        dispatch_message.apply_async(args=[str(outcome.msg_id), message.get("origin_conn")],
                                     argsrepr=f"[{outcome.msg_id}]")
    log.info("msg %s persisted (new=%s)", outcome.msg_id, outcome.stored)
    return {"msg_id": str(outcome.msg_id), "stored": outcome.stored}


@app.task(bind=True, acks_late=True, **RETRY)
def dispatch_message(self, msg_id: str, origin_conn: str | None = None) -> dict:
    """Live delivery, unread, offline index; a push for each offline recipient."""
    outcome = dispatch_private_message(storage(), int(msg_id), origin_conn)
    for user_id in outcome.offline_users:
        send_push.apply_async(args=[msg_id, str(user_id)], priority=PRIORITY_PRIVATE)
    log.info("msg %s dispatched: %d live connections, %d offline", msg_id, outcome.live_connections,
             len(outcome.offline_users))
    return {"msg_id": msg_id, "live": outcome.live_connections, "offline": [str(u) for u in outcome.offline_users]}


@app.task(bind=True, acks_late=True, **RETRY)
def send_push(self, msg_id: str, user_id: str) -> dict:
    """Record the push targets of an offline recipient (providers: issue #4)."""
    created = record_pending_pushes(storage(), int(msg_id), int(user_id), PRIORITY_PRIVATE)
    return {"msg_id": msg_id, "user_id": user_id, "pending": created}


@app.task(acks_late=True, **RETRY)
def sweep_presence() -> int:
    """Beat job: drop presence entries of crashed gateways."""
    s = storage()
    return sweep_presence_entries(s.redis, s.settings.presence_ttl_seconds)


def publish_persist(payload: dict, timeout: float) -> None:
    """Publish an accepted message to private_messages; returns once RabbitMQ confirmed it."""
    try:
        persist_message.apply_async(
            args=[payload], retry=True, retry_policy=GATEWAY_PUBLISH_RETRY,
            confirm_timeout=timeout, timeout=timeout,
            task_id=f"persist-{payload['msg_id']}", argsrepr=f"[msg {payload['msg_id']}]",
        )
    except Exception as exc:
        log.warning("msg %s not accepted: broker publish failed (%s)", payload["msg_id"], exc.__class__.__name__)
        raise Unavailable("message not accepted: the message broker is unavailable; "
                          "retry with the same client_msg_id") from None
