"""Container health probes used by deploy/Dockerfile and deploy/docker-compose.yml.

    python deploy/healthcheck.py http PATH [PORT]
        GET http://127.0.0.1:PORT/PATH (PORT defaults to $GATEWAY_PORT, else 8000);
        healthy on a 2xx answer.
    python deploy/healthcheck.py beat
        the same as `python -m tasks.health beat` (schedule file written in the
        last 10 minutes, broker reachable).

Celery workers and beat are probed with `python -m tasks.health` (see
docker-compose.yml and docs/operations.md). Exit status 0 means healthy, 1
unhealthy; one line of output says why, and Docker keeps it in `docker inspect`.
"""
from __future__ import annotations

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
    """Kept for callers of the old probe: the check lives in tasks/health.py now."""
    from tasks.health import main as health_main

    return health_main(["beat"])


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "http":
        return probe_http(argv[1], argv[2] if len(argv) > 2 else None)
    if argv == ["beat"]:
        return probe_beat()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
