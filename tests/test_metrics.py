"""Metrics and health checks, end to end: real gateway and workers, real scrapes.

This module runs its own gateway and workers on a broker of their own (a
RabbitMQ vhost, or another db of the bundled Redis), so no other worker of
the run takes their tasks and every number below is theirs alone. They share
the run's database and Redis with everything else.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import websocket
from sqlalchemy import select

from models import Device, Message, PushLog
from scripts.processes import ROOT, beat_command, free_port
from tests.harness import (
    ChatClient, Gateway, Process, Worker, extra_broker, register_and_login, sample, scrape, wait_until,
)


def worker_with_metrics(name, queues, services, log_dir, tmp, concurrency=2, **env):
    port = free_port()
    worker = Worker(name, queues, services, log_dir, concurrency=concurrency, WORKER_METRICS_PORT=str(port),
                    WORKER_METRICS_ADDRESS="127.0.0.1", PROMETHEUS_MULTIPROC_DIR=str(tmp / f"metrics-{name}"), **env)
    worker.metrics_url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: _answers(worker.metrics_url), timeout=10, what=f"{name} worker metrics endpoint")
    return worker


def _answers(url):
    try:
        scrape(url)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(services, log_dir, tmp_path_factory):
    from tests.conftest import PushFakes

    tmp = tmp_path_factory.mktemp("metrics")
    fakes = PushFakes(tmp)
    broker_url, drop_broker = extra_broker(services, "metrics")
    own = dataclasses.replace(services, broker_url=broker_url, cleanup=[])
    procs = []
    try:
        gateway = Gateway("gw-metrics", own, log_dir, **fakes.env)
        procs.append(gateway)
        persist = worker_with_metrics("persist", "private_messages,group_messages", own, log_dir, tmp, **fakes.env)
        procs.append(persist)
        dispatch = worker_with_metrics("dispatch", "offline_messages", own, log_dir, tmp, **fakes.env)
        procs.append(dispatch)
        push = worker_with_metrics("push", "push_tasks", own, log_dir, tmp, concurrency=1, **fakes.env)
        procs.append(push)
        yield SimpleNamespace(gateway=gateway, persist=persist, dispatch=dispatch, push=push, fakes=fakes,
                              services=own, log_dir=log_dir, tmp=tmp, procs=procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
        fakes.stop()
        drop_broker()


@pytest.fixture
def user(stack):
    return lambda: register_and_login(stack.gateway.http)


@pytest.fixture
def clients():
    opened = []
    yield opened
    for client in opened:
        client.close()


def gateway_metrics(stack):
    return scrape(stack.gateway.http + "/metrics")


def publish(stack, task: str, args: list, **options) -> None:
    """Send a task by name to this module's broker (the test process's own Celery app points elsewhere)."""
    from celery import Celery

    client = Celery("metrics-test")
    client.config_from_object("celeryconfig")
    client.conf.broker_url = stack.services.broker_url
    with client.connection_for_write() as conn:
        client.send_task(task, args=args, connection=conn, **options)


def test_gateway_counts_connections_frames_acks_errors_and_closes(stack, user, clients):
    alice, bob = user(), user()
    before = gateway_metrics(stack)
    a = ChatClient(stack.gateway.ws, alice.token)
    b = ChatClient(stack.gateway.ws, bob.token)
    clients += [a, b]
    wait_until(lambda: sample(gateway_metrics(stack), "netherlink_gateway_connections")
               == sample(before, "netherlink_gateway_connections") + 2, what="two open connections")

    acks = [a.send_message(bob.user_id, f"hello {i}") for i in range(3)]
    assert all(f["type"] == "ack" for f in acks)
    for ack in acks:
        b.wait_message(ack["msg_id"])
    a.send_json({"type": "ping"})
    a.next_frame(lambda f: f["type"] == "pong")
    assert a.send_message("999999999", "to nobody")["code"] == "not_found"
    a.send_json({"type": "send", "client_msg_id": "no-content", "to": bob.user_id})
    a.next_frame(lambda f: f.get("client_msg_id") == "no-content" and f["type"] == "error")
    a.send_json("this is not json")
    a.send_json({"type": "dance"})
    assert [a.next_frame(lambda f: f["type"] == "error")["code"] for _ in range(2)] == ["invalid_frame"] * 2

    b.ws.close(status=4321)  # a code of the client's own choosing: counted as "other"
    a.ws.close()             # 1000
    wait_until(lambda: sample(gateway_metrics(stack), "netherlink_gateway_connections")
               == sample(before, "netherlink_gateway_connections"), what="both connections closed")
    after = gateway_metrics(stack)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("netherlink_gateway_frames_in_total", type="send") == 5
    assert moved("netherlink_gateway_frames_in_total", type="ping") == 1
    assert moved("netherlink_gateway_frames_in_total", type="invalid") == 1
    assert moved("netherlink_gateway_frames_in_total", type="unknown") == 1
    assert moved("netherlink_gateway_frames_out_total", type="hello") == 2
    assert moved("netherlink_gateway_frames_out_total", type="ack") == 3
    assert moved("netherlink_gateway_frames_out_total", type="message") == 3  # bob's; not to alice's sending socket
    assert moved("netherlink_gateway_frames_out_total", type="pong") == 1
    assert moved("netherlink_gateway_frames_out_total", type="error") == 4
    assert moved("netherlink_gateway_ack_latency_seconds_count") == 3
    assert 0 < moved("netherlink_gateway_ack_latency_seconds_sum") < 3 * 5
    assert moved("netherlink_gateway_send_errors_total", code="not_found") == 1
    assert moved("netherlink_gateway_send_errors_total", code="invalid_frame") == 1
    assert moved("netherlink_gateway_connection_closes_total", code="1000") == 1
    assert moved("netherlink_gateway_connection_closes_total", code="other") == 1
    # The gateway's endpoint carries its own families and the process's, not the workers'.
    names = {name for name, _ in after}
    assert "process_resident_memory_bytes" in names
    assert not any(n.startswith(("netherlink_messages", "netherlink_push", "netherlink_queue")) for n in names)
    # Bounded labels only: never a user, connection or message id.
    assert {key for name, labels in after if name.startswith("netherlink_") for key, _ in labels} == \
        {"type", "code", "le"}


def test_workers_count_persisted_dispatched_and_delivery_latency(stack, user, clients, storage):
    alice, bob, carol = user(), user(), user()
    persist0, dispatch0 = scrape(stack.persist.metrics_url), scrape(stack.dispatch.metrics_url)
    a = ChatClient(stack.gateway.ws, alice.token)
    b = ChatClient(stack.gateway.ws, bob.token)
    clients += [a, b]
    online = [a.send_message(bob.user_id, f"live {i}") for i in range(3)]
    offline = [a.send_message(carol.user_id, f"for later {i}") for i in range(2)]
    for ack in online:
        b.wait_message(ack["msg_id"])

    def persisted(result):
        return sample(scrape(stack.persist.metrics_url), "netherlink_messages_persisted_total", result=result) \
            - sample(persist0, "netherlink_messages_persisted_total", result=result)

    def dispatched(recipient):
        return sample(scrape(stack.dispatch.metrics_url), "netherlink_messages_dispatched_total",
                      recipient=recipient) \
            - sample(dispatch0, "netherlink_messages_dispatched_total", recipient=recipient)

    wait_until(lambda: persisted("new") == 5, timeout=15, what="5 new messages persisted")
    wait_until(lambda: (dispatched("online"), dispatched("offline")) == (3, 2), timeout=15,
               what="3 dispatched to an online and 2 to an offline recipient")

    # A redelivered persist task (as after a worker crash) is counted as a duplicate.
    with storage.sessions() as session:
        row = session.get(Message, int(online[0]["msg_id"]))
    payload = {"msg_id": str(row.id), "conversation_id": row.conversation_id, "sender_id": row.sender_id,
               "to": row.receiver_id, "group_id": None, "client_msg_id": row.client_msg_id,
               "message_type": row.message_type, "content": row.content, "extra": row.extra or {},
               "timestamp": row.timestamp, "origin_conn": None}
    publish(stack, "tasks.pipeline.persist_message", [payload])
    wait_until(lambda: persisted("duplicate") == 1, timeout=15, what="the duplicate counted")
    assert persisted("new") == 5

    dispatch = scrape(stack.dispatch.metrics_url)
    for recipient, n in (("online", 3), ("offline", 2)):
        count = sample(dispatch, "netherlink_delivery_latency_seconds_count", recipient=recipient) \
            - sample(dispatch0, "netherlink_delivery_latency_seconds_count", recipient=recipient)
        assert count >= n  # the duplicate's second dispatch counts too
        within_30s = sample(dispatch, "netherlink_delivery_latency_seconds_bucket", recipient=recipient, le="30.0") \
            - sample(dispatch0, "netherlink_delivery_latency_seconds_bucket", recipient=recipient, le="30.0")
        assert within_30s == count
    persist = scrape(stack.persist.metrics_url)
    assert sample(persist, "netherlink_task_runtime_seconds_count", task="persist_message") >= 6
    # Each worker serves the pipeline's families, never the gateway's.
    assert not any(name.startswith("netherlink_gateway_") for name, _ in persist)


def test_push_outcomes_by_provider_and_result(stack, user, clients, storage):
    apns = stack.fakes.apns
    alice, bob, carol = user(), user(), user()
    ok_token, dead_token, slow_token = (secrets.token_hex(32) for _ in range(3))
    with storage.session() as session:
        session.add_all([Device(user_id=int(bob.user_id), platform="ios", token=ok_token),
                         Device(user_id=int(bob.user_id), platform="ios", token=dead_token),
                         Device(user_id=int(carol.user_id), platform="ios", token=slow_token)])
    apns.fail_token(dead_token, 410, "Unregistered")
    before = scrape(stack.push.metrics_url)

    def outcome(result):
        return sample(scrape(stack.push.metrics_url), "netherlink_push_outcomes_total", provider="apns",
                      result=result) \
            - sample(before, "netherlink_push_outcomes_total", provider="apns", result=result)

    def statuses(who):
        with storage.sessions() as session:
            return sorted((p.push_status, p.attempts) for p in session.scalars(
                select(PushLog).where(PushLog.user_id == int(who.user_id))))

    a = ChatClient(stack.gateway.ws, alice.token)
    clients.append(a)
    a.send_message(bob.user_id, "bob is offline")
    wait_until(lambda: statuses(bob) == [("failed", 1), ("success", 1)], timeout=20, what="bob's two pushes")
    assert (outcome("success"), outcome("failed")) == (1, 1)

    # Carol's push meets a 503 with Retry-After, and she reads the message before the second attempt.
    apns.fail_next(1, 503, "ServiceUnavailable", retry_after=4)
    ack = a.send_message(carol.user_id, "carol reads it first")
    wait_until(lambda: statuses(carol) == [("pending", 1)], timeout=20, what="carol's push waiting for a retry")
    c = ChatClient(stack.gateway.ws, carol.token)
    clients.append(c)
    c.send_json({"type": "read", "conversation_id": ack["conversation_id"], "msg_id": ack["msg_id"]})
    c.next_frame(lambda f: f["type"] == "read_ok")
    wait_until(lambda: statuses(carol) == [("skipped", 1)], timeout=20, what="carol's push skipped")
    wait_until(lambda: (outcome("retry"), outcome("skipped")) == (1, 1), timeout=5, what="retry and skip counted")
    assert (outcome("success"), outcome("failed")) == (1, 1)
    push = scrape(stack.push.metrics_url)
    # send_push makes the first attempts itself; Carol's retry is a deliver_push.
    assert sample(push, "netherlink_task_runtime_seconds_count", task="deliver_push") >= 1
    assert sample(push, "netherlink_task_runtime_seconds_count", task="send_push") >= 2


def test_task_failures_and_queue_depths(stack):
    dispatch0 = scrape(stack.dispatch.metrics_url)
    assert sample(dispatch0, "netherlink_queue_stats_up") == 1
    assert ("netherlink_queue_messages", frozenset({("queue", "offline_messages")})) in dispatch0
    persist0 = scrape(stack.persist.metrics_url)
    assert {("queue", "private_messages")} < {label for _, labels in persist0 for label in labels}

    # A dispatch for a message that was never stored fails for good.
    publish(stack, "tasks.pipeline.dispatch_message", [str(1 << 40), None])
    wait_until(lambda: sample(scrape(stack.dispatch.metrics_url), "netherlink_task_failures_total",
                              task="dispatch_message")
               == sample(dispatch0, "netherlink_task_failures_total", task="dispatch_message") + 1,
               timeout=15, what="the failure counted")
    if stack.services.real:  # RabbitMQ dead-letters it, and every worker sees that queue grow
        dead = ("netherlink_queue_messages", frozenset({("queue", "dead_letters")}))
        wait_until(lambda: scrape(stack.persist.metrics_url).get(dead) == dispatch0.get(dead, 0) + 1,
                   timeout=15, what="dead_letters one deeper")
        consumers = scrape(stack.persist.metrics_url)
        assert sample(consumers, "netherlink_queue_consumers", queue="private_messages") == 1
        assert sample(consumers, "netherlink_queue_consumers", queue="dead_letters") == 0


def test_task_retries_are_counted(stack, tmp_path):
    """A worker whose database is unusable retries its task (with backoff) until it comes back."""
    unusable = f"mysql+pymysql://root@127.0.0.1:{free_port()}/nowhere" if stack.services.real \
        else f"sqlite:///{tmp_path / 'empty.db'}"  # no schema: "no such table"
    probe = worker_with_metrics("retry-probe", "metrics_retry_probe", stack.services, stack.log_dir, tmp_path,
                                concurrency=1, DATABASE_URL=unusable)
    try:
        publish(stack, "tasks.pipeline.dispatch_message", ["1", None], queue="metrics_retry_probe")
        wait_until(lambda: sample(scrape(probe.metrics_url), "netherlink_task_retries_total",
                                  task="dispatch_message") >= 1, timeout=20, what="a retry counted")
    finally:
        probe.stop()


def health(stack, *args, broker_url=None):
    env = stack.services.env(BROKER_URL=broker_url or stack.services.broker_url)
    return subprocess.run([sys.executable, "-m", "tasks.health", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_queue_depths_are_absent_with_a_logged_reason_when_the_broker_cannot_tell(stack, caplog):
    from kombu import Connection

    from app.metrics import QueueDepthCollector

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    collector = QueueDepthCollector(lambda: Connection(dead, connect_timeout=1), ["private_messages"], amqp=True,
                                    timeout=1)
    for _ in range(2):
        families = {f.name: f for f in collector.collect()}
        assert list(families) == ["netherlink_queue_stats_up"]
        assert families["netherlink_queue_stats_up"].samples[0].value == 0
    assert caplog.text.count("queue depths not available: broker unreachable") == 1  # once per reason
    assert "guest:guest" not in caplog.text

    if stack.services.real:  # a queue RabbitMQ does not know is left out, the others are read
        collector = QueueDepthCollector(lambda: Connection(stack.services.broker_url), ["no_such_queue",
                                        "private_messages"], amqp=True)
        families = {f.name: f for f in collector.collect()}
        assert [s.labels["queue"] for s in families["netherlink_queue_messages"].samples] == ["private_messages"]
        assert families["netherlink_queue_stats_up"].samples[0].value == 1
        assert "queue(s) no_such_queue not declared on the broker yet" in caplog.text


def test_worker_health_command(stack):
    ok = health(stack, stack.persist.node)
    assert ok.returncode == 0 and ok.stdout.startswith(f"healthy: {stack.persist.node}@"), ok
    gone = health(stack, f"nobody-{uuid.uuid4().hex[:6]}", "--timeout", "1")
    assert gone.returncode == 1 and "did not answer within 1s" in gone.stdout, gone
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    cut_off = health(stack, stack.persist.node, "--timeout", "1", broker_url=dead_broker)
    assert cut_off.returncode == 1 and "broker unreachable" in cut_off.stdout, cut_off
    assert health(stack, "no such node!").returncode == 2


def test_beat_health_command(stack, tmp_path):
    schedule = tmp_path / "celerybeat-schedule"
    missing = health(stack, "beat", "--schedule", str(schedule))
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    beat = Process("beat-metrics", beat_command(schedule), stack.services.env(), stack.log_dir)
    try:
        wait_until(lambda: health(stack, "beat", "--schedule", str(schedule)).returncode == 0, timeout=30,
                   what="beat healthy")
        old = time.time() - 3600
        for path in tmp_path.glob("celerybeat-schedule*"):
            os.utime(path, (old, old))
        stale = health(stack, "beat", "--schedule", str(schedule), "--max-age", "600")
        assert stale.returncode == 1 and "not written for" in stale.stdout, stale
    finally:
        beat.stop()


def test_a_second_worker_on_the_same_metrics_directory_is_refused(stack, tmp_path):
    """Two workers on one PROMETHEUS_MULTIPROC_DIR would mix their numbers: the second one says so."""
    shared = str(stack.tmp / "metrics-persist")
    port = free_port()
    second = Worker("persist-2", "metrics_unused_queue", stack.services, stack.log_dir, concurrency=1,
                    WORKER_METRICS_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=shared)
    try:
        assert "is in use by another process" in second.log_text()
        with pytest.raises(OSError):
            scrape(f"http://127.0.0.1:{port}/metrics")
        assert sample(scrape(stack.persist.metrics_url), "netherlink_queue_stats_up") == 1
    finally:
        second.stop()


# --- alert rules, scrape config and dashboard ------------------------------------------------

DEPLOY = ROOT / "deploy"
PROMQL_WORDS = {"by", "without", "and", "or", "unless", "offset", "bool", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (not functions, label names, keywords or durations)."""
    import re

    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                      # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                     # ranges
    expr = re.sub(r"\boffset\s+[0-9a-z]+", "", expr)            # offsets
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        following = expr[match.end():].lstrip()[:1]
        if following != "(" and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def alert_rules():
    import yaml

    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_and_dashboard_query_reads_metrics_that_exist():
    import yaml

    from app.metrics import sample_names

    known = sample_names() | {"up"}  # `up`: Prometheus's own, per scrape target
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names and names <= known, (rule["alert"], names - known)
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    dashboard = json.loads((DEPLOY / "grafana" / "netherlink.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        names = promql_metric_names(expr.replace("$__rate_interval", "5m"))
        assert names and names <= known, (expr, names - known)
    # Every family a gateway or worker exposes is on the dashboard.
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in sample_names()
                if not n.endswith(("_sum", "_count"))}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for e in exprs for n in promql_metric_names(
        e.replace("$__rate_interval", "5m"))}
    assert families - {"netherlink_queue_stats_up"} <= shown, families - shown
    # The scrape jobs the alerts name exist.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"netherlink-gateway", "netherlink-worker"} <= jobs
    assert config["rule_files"] == ["alerts.yml"]


def test_operations_doc_covers_every_metric_and_alert():
    from app.metrics import sample_names

    doc = (ROOT / "docs" / "operations.md").read_text()
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for n in sample_names()}
    assert not {f for f in families if f not in doc}, "metrics missing from docs/operations.md"
    assert not {r["alert"] for r in alert_rules() if r["alert"] not in doc}, "alerts missing from docs/operations.md"


def test_promtool_accepts_the_rules_config_and_alert_unit_tests():
    """promtool (Debian package `prometheus`), which scripts/test.sh installs."""
    import shutil

    promtool = shutil.which("promtool")
    assert promtool is not None, ("promtool is missing: bash scripts/test.sh installs Debian's prometheus package "
                                  "(as root), or run 'apt-get install --no-install-recommends prometheus'")
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
