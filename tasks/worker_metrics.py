"""A Celery worker's metrics: task signals, and /metrics served from its main process.

With WORKER_METRICS_PORT set, the worker's main process serves
http://WORKER_METRICS_ADDRESS:WORKER_METRICS_PORT/metrics: the numbers of all
its pool processes (prometheus_client multiprocess mode, PROMETHEUS_MULTIPROC_DIR,
one directory per worker, wiped at start) and the depths of the queues it
consumes plus `dead_letters`, read from the broker at scrape time.
"""
from __future__ import annotations

import logging
import os
import time

from celery.signals import (
    task_failure, task_postrun, task_prerun, task_retry, worker_init, worker_process_shutdown, worker_ready,
)

from app import metrics
from tasks.runtime import settings as worker_settings

log = logging.getLogger(__name__)

_started: dict[str, float] = {}  # task id -> monotonic start, in the process running it
_server = None
_dir_ready = False


@worker_init.connect
def _claim_metrics_dir(sender=None, **_):
    """Main process, before the pool forks: a clean directory for this run's numbers."""
    global _dir_ready
    settings = worker_settings()
    if not settings.worker_metrics_port:
        _dir_ready = bool(metrics.MULTIPROC_DIR) and metrics.claim_multiproc_dir()
        return
    if not metrics.MULTIPROC_DIR:
        log.error("WORKER_METRICS_PORT is %d but PROMETHEUS_MULTIPROC_DIR is not set: worker metrics are "
                  "not served (set it to a directory of this worker's own)", settings.worker_metrics_port)
        return
    _dir_ready = metrics.claim_multiproc_dir()


@worker_ready.connect
def _serve_metrics(sender=None, **_):
    """Main process, pool started: serve /metrics on WORKER_METRICS_PORT."""
    global _server
    settings = worker_settings()
    if not settings.worker_metrics_port or not _dir_ready or _server is not None:
        return
    from prometheus_client import start_http_server

    from tasks import app

    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    if settings.broker_is_amqp:
        queues.append(app.conf.dead_letter_queue.name)
    depths = metrics.QueueDepthCollector(app.connection_for_read, queues, amqp=settings.broker_is_amqp)
    registry = metrics.registry_for(metrics.is_worker_metric, extra=[depths])
    try:
        _server, _thread = start_http_server(settings.worker_metrics_port, settings.worker_metrics_address,
                                             registry=registry)
    except OSError as exc:
        log.error("worker metrics not served: cannot listen on %s:%d (%s)", settings.worker_metrics_address,
                  settings.worker_metrics_port, exc)
        return
    log.info("worker metrics on http://%s:%d/metrics (queues %s)", settings.worker_metrics_address,
             settings.worker_metrics_port, ", ".join(queues))


@worker_process_shutdown.connect
def _process_gone(pid=None, **_):
    """A pool process exits: its live gauges go (counters stay, totals never go back)."""
    metrics.mark_process_dead(pid or os.getpid())


@task_prerun.connect
def _task_started(task_id=None, **_):
    _started[task_id] = time.monotonic()


@task_postrun.connect
def _task_finished(task_id=None, task=None, **_):
    started = _started.pop(task_id, None)
    if started is not None:
        metrics.TASK_RUNTIME.labels(metrics.task_name(task)).observe(time.monotonic() - started)


@task_retry.connect
def _task_retried(sender=None, **_):
    metrics.TASK_RETRIES.labels(metrics.task_name(sender)).inc()


@task_failure.connect
def _task_failed(sender=None, **_):
    metrics.TASK_FAILURES.labels(metrics.task_name(sender)).inc()
