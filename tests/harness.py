"""Test harness: isolated real services, real gateway and worker processes, a WS client.

A run gets its own MySQL database, RabbitMQ vhost and Redis db (real
services), or its own SQLite file and bundled redis-server (embedded), and
removes them afterwards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis
import requests
import websocket

from scripts.processes import (
    ROOT, child_env, free_port, gateway_command, port_open, start_embedded_redis, worker_command,
)

MYSQL_ADMIN_URL = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_ADMIN_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_JWT_SECRET = "test-secret-0123456789abcdef0123456789"


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `condition()` is truthy; returns its value or fails with `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def real_services_reachable() -> bool:
    return all(port_open("127.0.0.1", p) for p in (3306, 5672, 6379))


@dataclass
class Services:
    """Where this test run's isolated state lives."""

    kind: str  # "real" or "embedded"
    database_url: str
    broker_url: str
    redis_url: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.kind == "real"

    def env(self, **extra) -> dict[str, str]:
        return child_env(**{
            "DATABASE_URL": self.database_url, "BROKER_URL": self.broker_url, "REDIS_URL": self.redis_url,
            "NETHERLINK_ENV": "test", "JWT_SECRET": TEST_JWT_SECRET, "PASSWORD_HASH_PROFILE": "fast",
            "LOG_LEVEL": "INFO", **extra,
        })

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            try:
                fn()
            except Exception as exc:  # keep cleaning the rest
                print(f"cleanup step failed: {exc!r}")


def provision_real(run_id: str, broker: bool = True) -> Services:
    """A database, a Redis db and (unless `broker` is False: tests/unit needs none) a RabbitMQ vhost."""
    import pymysql

    db_name = f"nl_test_{run_id}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{db_name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    conn.close()

    def drop_db():
        c = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
        with c.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{db_name}`")
        c.close()

    vhost = f"nl_test_{run_id}"
    if broker:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)

    def drop_vhost():
        if broker:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)

    redis_db = claim_redis_db(run_id)

    def flush_redis():
        redis.Redis.from_url(f"{REDIS_ADMIN_URL}/{redis_db}").flushdb()

    services = Services(
        "real", f"mysql+pymysql://root@127.0.0.1:3306/{db_name}?charset=utf8mb4",
        f"{RABBITMQ_URL}{vhost}" if broker else "", f"{REDIS_ADMIN_URL}/{redis_db}",
    )
    services.cleanup += [drop_db, drop_vhost, flush_redis]
    return services


CLAIM_KEY = "nl:test:claimed-by"  # the harness's mark on a Redis db a run holds


def claim_redis_db(run_id: str) -> int:
    """An empty Redis db (1-15) that no other run holds; db 0 is left to humans."""
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_ADMIN_URL}/{db}")
        if client.dbsize() == 0 and client.set(CLAIM_KEY, run_id, nx=True, ex=6 * 3600):
            return db
    raise RuntimeError("no empty Redis db among 1-15 for the tests; flush a leftover one")


def flush_redis_keeping_claim(client) -> None:
    """Empty this run's Redis db (a Redis that lost its data) but keep the run's claim on it,
    so that a concurrent run does not take the db meanwhile."""
    claim = client.get(CLAIM_KEY)
    client.flushdb()
    if claim is not None:
        client.set(CLAIM_KEY, claim, ex=6 * 3600)


def provision_embedded(run_id: str, tmp: Path) -> Services:
    port = free_port()
    proc = start_embedded_redis(port, tmp / "redis", tmp / "redis.log")

    def stop_redis():
        proc.terminate()
        proc.wait(timeout=10)

    services = Services("embedded", f"sqlite:///{tmp / 'netherlink.db'}", f"redis://127.0.0.1:{port}/1",
                        f"redis://127.0.0.1:{port}/0")
    services.cleanup.append(stop_redis)
    return services


def extra_broker(services: Services, name: str) -> tuple[str, Callable[[], None]]:
    """A broker of its own for processes that must not share queues with the others of this run.

    Real services: a new RabbitMQ vhost; embedded: another db of the bundled Redis.
    Returns its URL and the function that removes it.
    """
    if not services.real:
        base = services.broker_url.rsplit("/", 1)[0]
        url = f"{base}/{2 + sum(map(ord, name)) % 13}"
        return url, lambda: redis.Redis.from_url(url).flushdb()
    vhost = f"{services.broker_url.rsplit('/', 1)[1]}_{name}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    return f"{RABBITMQ_URL}{vhost}", lambda: subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost],
                                                             capture_output=True, timeout=60)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition, by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain"), resp.headers
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 when absent (a labelled counter not moved yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class Process:
    """A child process in its own process group with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group (main process and pool children): a crash, not a shutdown."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def _wait_started(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Wait until the process is up; if it never is, stop it (nobody else holds it yet) and fail."""
        try:
            wait_until(condition, timeout=timeout, what=what)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.signal(signal.SIGKILL)  # leftover pool children
        self._log.close()


# Tests and benches make hundreds of users and connections from 127.0.0.1 in
# seconds: rate limits are off unless a test turns one on (tests/test_limits.py).
NO_RATE_LIMITS = {"SEND_RATE_PER_SECOND": "0", "FRAME_RATE_PER_SECOND": "0", "CONNECT_RATE_PER_MINUTE": "0",
                  "MAX_CONNECTIONS_PER_USER": "0", "LOGIN_RATE_PER_MINUTE": "0", "REGISTER_RATE_PER_MINUTE": "0"}


class Gateway(Process):
    def __init__(self, gateway_id: str, services: Services, log_dir: Path, **env):
        env = {**NO_RATE_LIMITS, **env}
        self.port = free_port()
        self.gateway_id = gateway_id
        super().__init__(f"gateway-{gateway_id}", gateway_command(self.port),
                         services.env(GATEWAY_ID=gateway_id, GATEWAY_PORT=str(self.port), **env), log_dir)
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/ws"
        self._wait_started(self._healthy, 30, f"gateway {gateway_id} health")

    def _healthy(self) -> bool:
        if not self.alive():
            raise AssertionError(f"gateway {self.gateway_id} exited:\n{self.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.http + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False


def wait_out_of_risk_window(redis_client, *gateways: "Gateway", timeout: float = 30.0) -> None:
    """Until every gateway saw the risk window after the last Redis loss close (app/chat/recovery.py):
    from then on an ack no longer waits for storage. Needs a send since the loss (`dedupe:since`)."""
    def closed():
        since = redis_client.get("dedupe:since")
        return since is not None and all(redis_client.get(f"dedupe:drained:{g.gateway_id}") == since
                                         for g in gateways)
    wait_until(closed, timeout=timeout, what="the gateways to leave the risk window after the Redis loss")


class Worker(Process):
    def __init__(self, name: str, queues: str, services: Services, log_dir: Path, concurrency: int = 2, **env):
        self.node = f"{name}-{uuid.uuid4().hex[:6]}"
        super().__init__(f"worker-{name}", worker_command(self.node, queues, concurrency), services.env(**env),
                         log_dir)
        self._wait_started(self._ready, 60, f"worker {name} ready")

    def _ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"worker {self.node} exited:\n{self.log_text()[-3000:]}")
        return f"{self.node}@" in self.log_text() and " ready." in self.log_text()


class ChatClient:
    """A WebSocket client that keeps every frame it receives, by type."""

    def __init__(self, url: str, token: str, use_header: bool = False, ticket: str | None = None):
        if ticket is not None:  # a one-time ticket of POST /api/ws-ticket
            self.ws = websocket.create_connection(f"{url}?ticket={ticket}", timeout=10)
        elif use_header:
            self.ws = websocket.create_connection(url, header=[f"Authorization: Bearer {token}"], timeout=10)
        else:
            self.ws = websocket.create_connection(f"{url}?token={token}", timeout=10)
        self.frames: list[dict] = []
        self.hello = self.next_frame(lambda f: f["type"] == "hello")

    def send_json(self, frame) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def _read_one(self, timeout: float) -> dict | None:
        self.ws.settimeout(timeout)
        try:
            raw = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    def next_frame(self, match: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """The first frame, already received or arriving within `timeout`, that matches."""
        for frame in self.frames:
            if match(frame) and not frame.get("_taken"):
                frame["_taken"] = True
                return frame
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self._read_one(max(0.01, deadline - time.monotonic()))
            if frame is not None and match(frame):
                frame["_taken"] = True
                return frame
        raise AssertionError(f"no matching frame within {timeout:.0f}s; received: {self.frames[-10:]}")

    def drain(self, quiet: float = 0.3) -> list[dict]:
        """Read until nothing arrives for `quiet` seconds; returns the new frames."""
        start = len(self.frames)
        while self._read_one(quiet) is not None:
            pass
        return self.frames[start:]

    def send_message(self, to: str, content: str, client_msg_id: str | None = None, **fields) -> dict:
        """Send and return the ack (or error) frame answering it."""
        cmid = client_msg_id or uuid.uuid4().hex
        self.send_json({"type": "send", "client_msg_id": cmid, "to": to, "content": content, **fields})
        return self.next_frame(lambda f: f.get("client_msg_id") == cmid and f["type"] in ("ack", "error"))

    def wait_message(self, msg_id: str, timeout: float = 10.0) -> dict:
        return self.next_frame(lambda f: f["type"] == "message" and f["msg_id"] == msg_id, timeout)

    def messages(self) -> list[dict]:
        return [f for f in self.frames if f["type"] == "message"]

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


@dataclass
class User:
    user_id: str
    username: str
    token: str  # the access token (JWT_TTL_SECONDS)
    refresh_token: str = ""
    password: str = "correct-horse"


def register_and_login(base_url: str, username: str | None = None, password: str = "correct-horse") -> User:
    username = username or f"u{uuid.uuid4().hex[:12]}"
    r = requests.post(f"{base_url}/api/auth/register", json={"username": username, "password": password}, timeout=10)
    assert r.status_code == 201, r.text
    r = requests.post(f"{base_url}/api/auth/login", json={"username": username, "password": password}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    return User(body["user_id"], username, body["access_token"], body["refresh_token"], password)
