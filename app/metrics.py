"""Prometheus metrics: every definition, and the small helpers that move them.

Who serves what (docs/operations.md, "Metrics and alerts"):

- a gateway serves `GET /metrics` on its own HTTP port (app/http/metrics.py):
  the `netherlink_gateway_*` families plus the process and Python collectors;
- a Celery worker serves the pipeline families (`netherlink_messages_*`,
  `netherlink_delivery_*`, `netherlink_push_*`, `netherlink_task_*`) and the
  queue depths on `WORKER_METRICS_PORT` from its main process
  (tasks/worker_metrics.py).

Several processes, one endpoint: a worker's tasks run in prefork children, so
workers need prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR`
names a directory (one per worker, never shared) where every process keeps its
values in small mmap files, and the main process adds them up at scrape time.
A gateway is one process and needs none of this; if one is ever run with
several gunicorn workers, it uses the same mode (ws/gunicorn_conf.py).

Labels are bounded sets named in code (frame types, error codes, close codes,
providers, task names, queue names): never a user id, message id or token.
"""
from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable

# prometheus_client opens its files there as soon as a metric is defined: make
# sure the directory exists before the first definition below.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if MULTIPROC_DIR:
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

from prometheus_client import (  # noqa: E402  (after the directory exists)
    REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.exposition import choose_encoder  # noqa: E402
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

from app.errors import ChatError  # noqa: E402
from app.ids import EPOCH_MS, NODE_BITS, SEQUENCE_BITS  # noqa: E402

log = logging.getLogger(__name__)

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

GATEWAY_PREFIX = "netherlink_gateway_"

# --- gateway -------------------------------------------------------------------

GATEWAY_CONNECTIONS = Gauge(
    "netherlink_gateway_connections", "Open WebSocket connections on this gateway.",
    multiprocess_mode="livesum")
GATEWAY_FRAMES_IN = Counter(
    "netherlink_gateway_frames_in", "Client frames received, by type; 'invalid' is not a JSON object with a "
    "string type, 'unknown' a type the gateway does not serve.", ["type"])
GATEWAY_FRAMES_OUT = Counter(
    "netherlink_gateway_frames_out", "Frames written to client sockets, by type.", ["type"])
GATEWAY_ACK_LATENCY = Histogram(
    "netherlink_gateway_ack_latency_seconds", "Time from receiving a send frame to queuing its ack "
    "(validation, dedupe, id, confirmed publish to the broker).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
GATEWAY_SEND_ERRORS = Counter(
    "netherlink_gateway_send_errors", "send frames answered with an error frame, by error code.", ["code"])
GATEWAY_CLOSES = Counter(
    "netherlink_gateway_connection_closes", "Closed WebSocket connections, by close code: the code the "
    "gateway closed with, else the client's; 1005 when none was exchanged (the client vanished).", ["code"])

# --- pipeline (Celery workers) --------------------------------------------------

MESSAGES_PERSISTED = Counter(
    "netherlink_messages_persisted", "persist_message runs, by result: 'new' stored the message, "
    "'duplicate' found it stored already (a redelivery or a retried send).", ["result"])
MESSAGES_DISPATCHED = Counter(
    "netherlink_messages_dispatched", "Messages dispatched, by whether the recipient had a live connection.",
    ["recipient"])
DELIVERY_LATENCY = Histogram(
    "netherlink_delivery_latency_seconds", "Time from a message's timestamp (made at the gateway with its id) "
    "to the end of its dispatch: the hand-off to the recipients' gateways, or to the offline path.",
    ["recipient"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
PUSH_OUTCOMES = Counter(
    "netherlink_push_outcomes", "Push delivery attempts, by provider (apns, fcm, email) and result "
    "(success, failed, skipped, retry).", ["provider", "result"])
TASK_RETRIES = Counter("netherlink_task_retries", "Celery task retries, by task.", ["task"])
TASK_FAILURES = Counter(
    "netherlink_task_failures", "Celery tasks that failed for good (dead-lettered with RabbitMQ), by task.",
    ["task"])
TASK_RUNTIME = Histogram(
    "netherlink_task_runtime_seconds", "Run time of Celery tasks in the worker, by task.", ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))

# Queue depths are read from the broker at scrape time (QueueDepthCollector).
QUEUE_MESSAGES, QUEUE_CONSUMERS, QUEUE_STATS_UP = (
    "netherlink_queue_messages", "netherlink_queue_consumers", "netherlink_queue_stats_up")

# --- gateway helpers -------------------------------------------------------------

_known_frame_types: set[str] = set()
_FRAME_TYPE_RE = re.compile(r'\{"type": ?"([a-z_]{1,32})"')
# Close codes a client may send are its choice: anything else is counted as "other".
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012,
                               4401, 4408, 4429, 4503})


def serve_frame_types(kinds) -> None:
    """The frame types the gateway serves (frames of any other type count as "unknown")."""
    _known_frame_types.update(kinds)


@contextmanager
def timed_send():
    """Time a `send` from its frame to its ack; a refused send counts by its error code."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        GATEWAY_SEND_ERRORS.labels(exc.code if isinstance(exc, ChatError) else "internal").inc()
        raise
    GATEWAY_ACK_LATENCY.observe(time.monotonic() - started)


def frame_in(kind: str | None) -> None:
    """One client frame: its type if the gateway serves it."""
    label = kind if kind in _known_frame_types else ("invalid" if kind is None else "unknown")
    GATEWAY_FRAMES_IN.labels(label).inc()


def frame_out(data: str) -> None:
    """One frame written; every server frame is serialized with "type" first."""
    match = _FRAME_TYPE_RE.match(data)
    GATEWAY_FRAMES_OUT.labels(match.group(1) if match else "other").inc()


def connection_opened() -> None:
    GATEWAY_CONNECTIONS.inc()


def connection_closed(code: int | None) -> None:
    GATEWAY_CONNECTIONS.dec()
    code = int(code) if code is not None else 1005
    GATEWAY_CLOSES.labels(str(code) if code in KNOWN_CLOSE_CODES else "other").inc()


# --- pipeline helpers -------------------------------------------------------------

def message_persisted(stored: bool) -> None:
    MESSAGES_PERSISTED.labels("new" if stored else "duplicate").inc()


def message_dispatched(outcome, now_ms: Callable[[], float] = lambda: time.time() * 1000) -> None:
    """A dispatch ran to its end (a DispatchOutcome: msg_id, offline_users)."""
    recipient = "offline" if outcome.offline_users else "online"
    MESSAGES_DISPATCHED.labels(recipient).inc()
    made_ms = (int(outcome.msg_id) >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS
    DELIVERY_LATENCY.labels(recipient).observe(max(0.0, now_ms() - made_ms) / 1000)


_PUSH_RESULTS = {"success": "success", "failed": "failed", "skipped": "skipped", "pending": "retry"}


def push_outcome(provider: str, status: str) -> None:
    """One push attempt recorded in push_log; `pending` after an attempt means a retry is scheduled."""
    PUSH_OUTCOMES.labels(provider, _PUSH_RESULTS.get(status, status)).inc()


def sample_names() -> set[str]:
    """Every sample name NetherLink exposes (for checks of alert rules and dashboards)."""
    names = {QUEUE_MESSAGES, QUEUE_CONSUMERS, QUEUE_STATS_UP}
    for metric in [m for m in globals().values() if isinstance(m, MetricWrapperBase)]:
        for family in metric.describe():
            names |= {family.name + suffix for suffix in
                      {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])}
    return names


def task_name(task) -> str:
    return str(getattr(task, "name", task) or "unknown").rsplit(".", 1)[-1]


# --- exposition -------------------------------------------------------------------

class _Filtered:
    """A collector showing only the metric families `keep` accepts."""

    def __init__(self, source, keep: Callable[[str], bool], before: Callable[[], None] | None = None):
        self.source, self.keep, self.before = source, keep, before

    def collect(self):
        if self.before is not None:
            self.before()
        for family in self.source.collect():
            if self.keep(family.name):
                yield family


def is_gateway_metric(name: str) -> bool:
    """Gateway endpoint: its own families and the process/Python collectors."""
    return name.startswith(GATEWAY_PREFIX) or not name.startswith("netherlink_")


def is_worker_metric(name: str) -> bool:
    return name.startswith("netherlink_") and not name.startswith(GATEWAY_PREFIX)


def registry_for(keep: Callable[[str], bool], extra: Iterable = ()) -> CollectorRegistry:
    """What one endpoint serves: this process's metrics, or every process's in multiprocess mode."""
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROC_DIR:
        source = multiprocess.MultiProcessCollector(None, path=MULTIPROC_DIR)
        registry.register(_Filtered(source, keep, before=lambda: reap_dead_processes(MULTIPROC_DIR)))
    else:
        registry.register(_Filtered(REGISTRY, keep))
    for collector in extra:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition (text format, or OpenMetrics when asked for) and its content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


# --- multiprocess bookkeeping -----------------------------------------------------

_DB_FILE_RE = re.compile(r"_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that died without saying so (SIGKILL, OOM).

    Counters and histograms of dead processes stay: their totals must not go back.
    """
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _DB_FILE_RE.search(name)
        if match and not _pid_alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), path)


def mark_process_dead(pid: int) -> None:
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(pid, MULTIPROC_DIR)


_dir_lock = None


def claim_multiproc_dir(path: str = "") -> bool:
    """Take the directory for this process tree and wipe what a previous run left.

    Called once by the main process before it forks its children (worker_init,
    gunicorn's on_starting). Files of this very process stay (it may have made
    them at import). False, with an ERROR logged, when another live process
    holds the directory: two workers sharing one would mix their numbers.
    """
    global _dir_lock
    path = path or MULTIPROC_DIR
    if not path:
        return False
    os.makedirs(path, exist_ok=True)
    lock = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        log.error("PROMETHEUS_MULTIPROC_DIR %s is in use by another process; give every worker its own "
                  "directory (metrics of this one are not served)", path)
        return False
    _dir_lock = lock  # held for the life of this process (and its children, which inherit it)
    own = f"_{os.getpid()}.db"
    for name in glob.glob(os.path.join(path, "*.db")):
        if not name.endswith(own):
            os.remove(name)
    return True


# --- queue depths -----------------------------------------------------------------

class QueueDepthCollector:
    """Depth (ready messages) and consumers of some queues, asked of the broker at scrape time.

    Over AMQP with a passive queue.declare, which every RabbitMQ answers (no
    management plugin needed); with a Redis broker from the list lengths
    (consumers are not known there). When the broker cannot be asked, the
    depth gauges are absent, `netherlink_queue_stats_up` is 0 and the log says
    why (once per distinct reason).
    """

    def __init__(self, connect: Callable, queues: Iterable[str], amqp: bool, timeout: float = 3.0):
        self.connect = connect  # -> a kombu Connection, not yet connected
        self.queues = list(dict.fromkeys(queues))
        self.amqp = amqp
        self.timeout = timeout
        self._lock = threading.Lock()
        self._last_problem: str | None = None

    def collect(self):
        up = GaugeMetricFamily(QUEUE_STATS_UP,
                               "1 when this scrape read the queue depths from the broker, 0 when it could not.")
        with self._lock:  # one broker round trip at a time, however many scrapers
            try:
                depths = self._read()
            except Exception as exc:
                self._problem(f"broker unreachable ({exc.__class__.__name__}: {_redact(exc)})")
                up.add_metric([], 0)
                yield up
                return
        messages = GaugeMetricFamily(QUEUE_MESSAGES,
                                     "Messages ready in the queue (not yet delivered to a worker).", labels=["queue"])
        consumers = GaugeMetricFamily(QUEUE_CONSUMERS, "Consumers attached to the queue (one per worker "
                                      "node, whatever its concurrency); RabbitMQ only.", labels=["queue"])
        for queue, (count, consumer_count) in depths.items():
            messages.add_metric([queue], count)
            if self.amqp:
                consumers.add_metric([queue], consumer_count)
        up.add_metric([], 1)
        yield messages
        if self.amqp:
            yield consumers
        yield up

    def _read(self) -> dict[str, tuple[int, int]]:
        depths: dict[str, tuple[int, int]] = {}
        missing = []
        with self.connect() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.timeout)
            channel = conn.channel()
            try:
                for queue in self.queues:
                    try:
                        ok = channel.queue_declare(queue=queue, passive=self.amqp)
                    except conn.channel_errors:  # not declared yet; the channel is closed by now
                        missing.append(queue)
                        channel = conn.channel()
                        continue
                    depths[queue] = (ok.message_count, ok.consumer_count)
            finally:
                try:
                    channel.close()
                except Exception:
                    pass
        if missing:
            self._problem(f"queue(s) {', '.join(missing)} not declared on the broker yet")
        elif self._last_problem is not None:
            log.info("queue depths: reading them again")
            self._last_problem = None
        return depths

    def _problem(self, why: str) -> None:
        if why != self._last_problem:
            log.warning("queue depths not available: %s", why)
            self._last_problem = why


def _redact(exc: Exception) -> str:
    """An error text without credentials a URL in it might carry."""
    return re.sub(r"//[^/@\s]*@", "//***@", str(exc))[:200]
