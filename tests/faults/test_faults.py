"""Fault injection: a steady load across two gateways while, one at a time, a
worker is SIGKILLed, RabbitMQ restarts, Redis is flushed and restarted,
MariaDB stops and starts, or a gateway is killed. Each run reports messages
acked, stored, in their recipient's stream, lost (must be 0), duplicated
(must be 0) and the recovery time, and appends that line to
test-artifacts/faults/report.jsonl.

Short form (CI, part of `bash scripts/test.sh`): each outage lasts
FAULT_DOWN_SECONDS (default 5). Long form: `FAULT_DOWN_SECONDS=30
bash scripts/test.sh tests/faults` (docs/reliability.md).

Restarting the real services needs root, which this machine and CI have;
every service is brought back even when a test fails (scripts/ensure_services.sh).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from models import Message
from tests.faults.load import Sender, sync_all
from scripts.processes import port_open
from tests.harness import ROOT, Gateway, Worker, register_and_login, wait_until

DOWN_SECONDS = float(os.environ.get("FAULT_DOWN_SECONDS", "5"))
PAIRS = int(os.environ.get("FAULT_PAIRS", "3"))
SEND_INTERVAL = 0.1  # per sender: about 10 messages/s per sender
CONVERGE_TIMEOUT = 120.0
REPORT = ROOT / "test-artifacts" / "faults" / "report.jsonl"


class FaultCluster:
    """Its own gateways and workers: the faults must not leave the shared ones half-broken."""

    def __init__(self, services, log_dir):
        self.services, self.log_dir = services, log_dir
        self.gateways = [Gateway(f"fgw{i}", services, log_dir) for i in (1, 2)]
        self.persist = self.dispatch = self.push = None
        self.ensure_workers()

    def ensure_workers(self) -> None:
        for name, queues, concurrency in (("persist", "private_messages,group_messages", 2),
                                          ("dispatch", "offline_messages", 2), ("push", "push_tasks", 1)):
            worker = getattr(self, name)
            if worker is None or not worker.alive():
                if worker is not None:
                    worker.stop()
                setattr(self, name, Worker(f"f{name}", queues, self.services, self.log_dir,
                                           concurrency=concurrency))

    def ensure_gateways(self) -> None:
        for i, gateway in enumerate(self.gateways):
            if not gateway.alive():
                gateway.stop()
                self.gateways[i] = Gateway(gateway.gateway_id, self.services, self.log_dir)

    def stop(self) -> None:
        for proc in [*self.gateways, self.persist, self.dispatch, self.push]:
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def faults(services, log_dir, storage):
    if not services.real:
        pytest.skip("restarts the real RabbitMQ, Redis and MariaDB")
    # Redis starts empty, as on a new deployment: every scenario begins in the risk
    # window after a Redis loss (app/chat/recovery.py), nothing is backdated.
    fc = FaultCluster(services, log_dir)
    yield fc
    fc.stop()


@pytest.fixture(autouse=True)
def services_restored():
    yield
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_services.sh")], check=False, timeout=180)


# -- the faults ------------------------------------------------------------------

def _run(*cmd: str, timeout: float = 120) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def _wait_port(port: int, up: bool, what: str) -> None:
    wait_until(lambda: port_open("127.0.0.1", port) == up, timeout=90, interval=0.2,
               what=f"{what} {'up' if up else 'down'}")


def restart_rabbitmq() -> None:
    _run("rabbitmqctl", "stop_app")  # every connection drops; durable queues and persistent messages stay
    time.sleep(DOWN_SECONDS)  # the outage itself
    _run("rabbitmqctl", "start_app")
    _run("rabbitmqctl", "await_startup")


def flush_and_restart_redis() -> None:
    _run("redis-cli", "-p", "6379", "FLUSHALL")
    subprocess.run(["redis-cli", "-p", "6379", "SHUTDOWN", "NOSAVE"], capture_output=True, timeout=30)
    _wait_port(6379, False, "redis")
    time.sleep(DOWN_SECONDS)
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_services.sh")], check=True, timeout=120)


def stop_and_start_mariadb() -> None:
    _run("start-stop-daemon", "--stop", "--retry", "60", "--exec", "/usr/sbin/mariadbd")
    _wait_port(3306, False, "mariadb")
    time.sleep(DOWN_SECONDS)
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_services.sh")], check=True, timeout=120)


# -- the load and the verdict ------------------------------------------------------

def _stored(storage, sender_ids) -> dict:
    with storage.sessions() as session:
        rows = session.execute(select(Message.sender_id, Message.client_msg_id, Message.id)
                               .where(Message.sender_id.in_(sender_ids))).all()
    return {(str(s), c): str(i) for s, c, i in rows}


def run_with_fault(name: str, faults: FaultCluster, storage, inject) -> dict:
    users = [register_and_login(faults.gateways[0].http) for _ in range(2 * PAIRS)]
    senders = [Sender(users[i], users[i + PAIRS].user_id, faults.gateways, f"{name}-{i}", SEND_INTERVAL,
                      first_gateway=i).start() for i in range(PAIRS)]
    try:
        wait_until(lambda: all(len(s.stats.acked) >= 3 for s in senders), timeout=60, what="a steady load")
        started = time.monotonic()
        inject()
        faults.ensure_workers()  # a killed process is replaced, as systemd or compose would
        faults.ensure_gateways()
        healed = time.monotonic()
        # Service is back when every sender has had an ack after the fault was healed.
        wait_until(lambda: all(s.stats.last_ack_at > healed for s in senders), timeout=CONVERGE_TIMEOUT,
                   what="acks again after the fault")
        acks_back = time.monotonic()
        marks = [len(s.stats.acked) for s in senders]
        wait_until(lambda: all(len(s.stats.acked) >= m + 3 for s, m in zip(senders, marks)), timeout=60,
                   what="the load running on")
    finally:
        for sender in senders:
            sender.finish()

    acked = {(s.user.user_id, cmid): msg_id for s in senders for cmid, msg_id in s.stats.acked.items()}
    recipients = {s.user.user_id: s.peer_id for s in senders}
    tokens = {u.user_id: u.token for u in users}

    def converged():
        stored = _stored(storage, [int(s.user.user_id) for s in senders])
        return all(key in stored for key in acked) and stored

    stored = wait_until(converged, timeout=CONVERGE_TIMEOUT, what="every acked message stored")
    streams, deadline = {}, time.monotonic() + CONVERGE_TIMEOUT
    for sender_id, recipient in recipients.items():
        expected = {stored[key] for key in acked if key[0] == sender_id}
        while True:
            entries = sync_all(faults.gateways, tokens[recipient], deadline)
            got = [e["msg_id"] for e in entries if e["type"] == "message"]
            if expected <= set(got) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        streams[recipient] = (expected, got)
    in_streams = time.monotonic()

    lost = sum(1 for key in acked if key not in stored) + sum(len(exp - set(got)) for exp, got in streams.values())
    duplicated = sum(n - 1 for _, got in streams.values() for n in Counter(got).values() if n > 1)
    with storage.sessions() as session:  # UNIQUE(sender_id, client_msg_id) makes this 0 unless it was dropped
        duplicated += sum(n - 1 for n in Counter(
            (s, c) for s, c in session.execute(select(Message.sender_id, Message.client_msg_id).where(
                Message.sender_id.in_([int(x) for x in recipients]))).all()).values() if n > 1)
    report = {
        "fault": name, "down_seconds": DOWN_SECONDS, "senders": len(senders), "acked": len(acked),
        "stored": sum(1 for key in acked if key in stored),
        "in_recipient_streams": sum(len(exp & set(got)) for exp, got in streams.values()),
        "lost": lost, "duplicated": duplicated,
        "error_frames": dict(sum((s.stats.errors for s in senders), Counter())),
        "reconnects": sum(s.stats.reconnects for s in senders) - len(senders),
        "silences": sum(s.stats.silences for s in senders),
        "fault_seconds": round(healed - started, 1), "acks_back_after_s": round(acks_back - healed, 1),
        "all_in_streams_after_s": round(in_streams - healed, 1),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(json.dumps(report) + "\n")
    print(json.dumps(report))
    return report


def assert_nothing_lost(report: dict) -> None:
    assert report["acked"] > 0
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["silences"] == 0, report  # every send got an ack or an error frame


@pytest.mark.parametrize("worker", ["persist", "dispatch", "push"])
def test_a_worker_sigkilled_under_load(faults, storage, worker):
    assert_nothing_lost(run_with_fault(f"kill-{worker}", faults, storage,
                                       lambda: getattr(faults, worker).kill()))


def test_a_gateway_killed_under_load(faults, storage):
    assert_nothing_lost(run_with_fault("kill-gateway", faults, storage, lambda: faults.gateways[1].kill()))


def test_rabbitmq_restarted_under_load(faults, storage):
    assert_nothing_lost(run_with_fault("restart-rabbitmq", faults, storage, restart_rabbitmq))


def test_redis_flushed_and_restarted_under_load(faults, storage):
    assert_nothing_lost(run_with_fault("flush-restart-redis", faults, storage, flush_and_restart_redis))


def test_mariadb_stopped_and_started_under_load(faults, storage):
    assert_nothing_lost(run_with_fault("stop-start-mariadb", faults, storage, stop_and_start_mariadb))
