"""What a worker process holds: its Settings (read once), its Storage and its push
provider clients, each made after fork (connections are never shared across processes)."""
from __future__ import annotations

import logging
import os
from functools import lru_cache

from celery.signals import worker_process_init

from app.config import Settings
from app.storage import Storage

log = logging.getLogger(__name__)

_storage: Storage | None = None
_providers: dict | None = None
_pid: int | None = None


@lru_cache(maxsize=1)
def settings() -> Settings:
    """This worker's settings, from its environment, read once."""
    return Settings.from_env()


def storage() -> Storage:
    """This process's Storage."""
    global _storage
    _forget_after_fork()
    if _storage is None:
        _storage = Storage(settings())
    return _storage


def providers() -> dict:
    """This process's push provider clients by name; a provider whose settings are missing is left out (logged)."""
    global _providers
    _forget_after_fork()
    if _providers is None:
        from app.push.providers.apns import ApnsClient
        from app.push.providers.email import EmailClient
        from app.push.providers.fcm import FcmClient
        from app.push.providers.webpush import WebPushClient

        _providers = {"email": EmailClient(settings())}
        for name, client_class in (("apns", ApnsClient), ("fcm", FcmClient), ("webpush", WebPushClient)):
            try:
                _providers[name] = client_class(settings())
            except ValueError as exc:
                log.warning("%s pushes disabled: %s", name, exc)
    return _providers


def _forget_after_fork() -> None:
    global _storage, _providers, _pid
    if _pid != os.getpid():
        _storage, _providers, _pid = None, None, os.getpid()


@worker_process_init.connect
def _fresh_connections(**_):
    global _pid
    _pid = None
