"""Container health probes used by deploy/Dockerfile and deploy/docker-compose.yml.

    python deploy/healthcheck.py http PATH [PORT]
        GET http://127.0.0.1:PORT/PATH (PORT defaults to $GATEWAY_PORT, else 8000);
        healthy on a 2xx answer.
    python deploy/healthcheck.py beat
        Celery beat: its schedule file exists (beat opened it at start) and the
        broker it publishes to accepts a connection.

Celery workers are probed with `celery -A tasks inspect ping` instead (see
docker-compose.yml). Exit status 0 means healthy, 1 unhealthy; one line of
output says why, and Docker keeps it in `docker inspect`.
"""
from __future__ import annotations

import glob
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def probe_http(path: str, port: str | None = None) -> int:
    port = port or os.environ.get("GATEWAY_PORT") or "8000"
    url = f"http://127.0.0.1:{port}{path}"
    # A proxy configured for outbound traffic (APNs, FCM) must not intercept this.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    if 200 <= status < 300:
        print(f"healthy: {url} -> {status}")
        return 0
    print(f"unhealthy: {url} -> {status}")
    return 1


def probe_beat() -> int:
    schedule = os.environ.get("BEAT_SCHEDULE_FILE", "/tmp/celerybeat-schedule")
    # dbm backends name the file with or without a suffix (.db, .dat, ...).
    if not glob.glob(glob.escape(schedule) + "*"):
        print(f"unhealthy: beat schedule file {schedule} does not exist")
        return 1
    broker_url = os.environ.get("BROKER_URL")
    if not broker_url:
        print("healthy: schedule file present (no BROKER_URL to check)")
        return 0
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT_SECONDS)
    except Exception as exc:  # any failure to reach the broker is the answer
        print(f"unhealthy: broker unreachable: {exc.__class__.__name__}")
        return 1
    print("healthy: schedule file present, broker reachable")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "http":
        return probe_http(argv[1], argv[2] if len(argv) > 2 else None)
    if argv == ["beat"]:
        return probe_beat()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
