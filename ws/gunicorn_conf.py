"""gunicorn settings of a gateway: `gunicorn -c ws/gunicorn_conf.py --bind 0.0.0.0:8000 wsgi:app`.

SIGTERM drains the gateway: every client is told to reconnect elsewhere
(close code 1012) once its frame in progress is answered, the gateway's
presence is withdrawn, and the worker exits within GATEWAY_DRAIN_SECONDS.

Metrics: GET /metrics is served by the (single) worker process from its own
memory. If a deployment overrides `workers` (GUNICORN_CMD_ARGS=--workers=N),
it must also set PROMETHEUS_MULTIPROC_DIR to a directory of this gateway's
own: the master wipes it at start and /metrics then adds up every worker.
"""
import os
import signal

worker_class = "gevent"
workers = 1  # one process per GATEWAY_ID keeps its snowflake lease and channel simple; run more gateways instead
worker_connections = int(os.environ.get("GATEWAY_MAX_CONNECTIONS", "10000"))
graceful_timeout = int(os.environ.get("GATEWAY_DRAIN_SECONDS", "10"))


def post_worker_init(worker):
    """Chain a drain of our sockets in front of gunicorn's own graceful stop."""
    stop = worker.handle_exit

    def drain_then_stop(sig, frame):
        import gevent

        gateway = worker.wsgi.extensions.get("netherlink.gateway")
        if gateway is not None:
            gevent.spawn(gateway.drain)
        stop(sig, frame)

    signal.signal(signal.SIGTERM, drain_then_stop)


def on_starting(server):
    """Master, before any worker: a clean multiprocess metrics directory, if one is configured."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from app.metrics import claim_multiproc_dir

        claim_multiproc_dir()


def child_exit(server, worker):
    """A worker is gone: its open-connections gauge goes with it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from app.metrics import mark_process_dead

        mark_process_dead(worker.pid)
