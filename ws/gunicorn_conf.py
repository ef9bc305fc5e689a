"""gunicorn settings of a gateway: `gunicorn -c ws/gunicorn_conf.py --bind 0.0.0.0:8000 wsgi:app`.

SIGTERM drains the gateway: every client is told to reconnect elsewhere
(close code 1012) once its frame in progress is answered, the gateway's
presence is withdrawn, and the worker exits within GATEWAY_DRAIN_SECONDS.
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
