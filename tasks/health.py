"""Health of this host's Celery worker or beat: `python -m tasks.health FAMILY|NODE|beat`.

    python -m tasks.health persist              # the worker persist@<this host> answers a ping
    python -m tasks.health persist@host-2       # a worker given by its node name
    python -m tasks.health beat                 # beat's schedule file is fresh and the broker answers
        [--schedule FILE] [--max-age SECONDS]

Exit status 0: healthy; 1: unhealthy; 2: bad usage. One line on stdout says
why, which Docker keeps in `docker inspect` (deploy/docker-compose.yml).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

DEFAULT_TIMEOUT = 5.0
DEFAULT_SCHEDULE = "/tmp/celerybeat-schedule"
# Beat writes its schedule file back at least every 3 minutes while it sends tasks (sweep_presence runs
# every 60 s), so a file untouched for 10 minutes means beat is stuck or gone.
DEFAULT_BEAT_MAX_AGE = 600.0
NODE_RE = re.compile(r"[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-]+)?")


def node_name(target: str) -> str:
    """`persist` -> `persist@<hostname as Celery's %h gives it>`; a full node name stays."""
    if "@" in target:
        return target
    from celery.utils.nodenames import host_format

    return host_format(f"{target}@%h")


def check_worker(target: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    from tasks import app

    node = node_name(target)
    started = time.monotonic()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.ping(destination=[node], timeout=timeout, connection=conn)
    except Exception as exc:  # whatever keeps us from asking is the answer
        return False, f"unhealthy: {node}: broker unreachable ({exc.__class__.__name__})"
    for reply in replies or []:
        if node in reply and reply[node].get("ok") == "pong":
            return True, f"healthy: {node} answered in {(time.monotonic() - started) * 1000:.0f} ms"
    return False, (f"unhealthy: {node} did not answer within {timeout:g}s "
                   "(worker down, stuck, or cut off from the broker)")


def check_beat(schedule: str, max_age: float, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    # dbm backends name the file with or without a suffix (.db, .dat, ...).
    files = glob.glob(glob.escape(schedule) + "*")
    if not files:
        return False, f"unhealthy: beat schedule file {schedule} does not exist (beat not started?)"
    age = time.time() - max(os.path.getmtime(f) for f in files)
    if age > max_age:
        return False, f"unhealthy: beat schedule file {schedule} not written for {age:.0f}s (limit {max_age:g}s)"
    from kombu import Connection

    from app.config import Settings

    try:
        with Connection(Settings.from_env().broker_url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        return False, f"unhealthy: beat's broker unreachable ({exc.__class__.__name__})"
    return True, f"healthy: beat schedule written {age:.0f}s ago, broker reachable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="a queue family (persist, dispatch, push), a node name, or 'beat'")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait (default 5)")
    parser.add_argument("--schedule", default=os.environ.get("BEAT_SCHEDULE_FILE", DEFAULT_SCHEDULE),
                        help=f"beat's schedule file (default $BEAT_SCHEDULE_FILE or {DEFAULT_SCHEDULE})")
    parser.add_argument("--max-age", type=float, default=DEFAULT_BEAT_MAX_AGE,
                        help="beat: oldest acceptable schedule file, in seconds (default 600)")
    args = parser.parse_args(argv)
    if args.target != "beat" and not NODE_RE.fullmatch(args.target):
        parser.error(f"not a queue family or node name: {args.target!r}")
    if args.target == "beat":
        ok, message = check_beat(args.schedule, args.max_age, args.timeout)
    else:
        ok, message = check_worker(args.target, args.timeout)
    print(message, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
