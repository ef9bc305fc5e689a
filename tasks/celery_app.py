"""The one place that builds and configures the Celery app, from Settings.

`tasks.app` (what `celery -A tasks` finds) is made here from the process's
environment. The task modules are loaded by the worker, beat and Flower
through `include`, not on import: a gateway that publishes through
tasks/publish.py loads none of them (nor their provider preloads or signals).
"""
from __future__ import annotations

from celery import Celery

import celeryconfig
from app.config import Settings

TASK_MODULES = ("tasks.messages", "tasks.push", "tasks.housekeeping", "tasks.dead_letters", "tasks.worker_metrics")


def make_celery(settings: Settings) -> Celery:
    app = Celery("netherlink", include=list(TASK_MODULES))
    app.conf.update(celeryconfig.from_settings(settings))
    return app
