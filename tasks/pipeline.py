"""Celery tasks: thin adapters from queue messages to app.messaging.

Each task takes primitive ids (persist takes the accepted message itself,
which exists nowhere else yet), is idempotent, declares its retry policy, and
enqueues the next step only after its own commit.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time

from celery.signals import worker_init, worker_process_init, worker_ready
from kombu import Producer
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, IntegrityError

from app import maintenance, metrics
from app.config import Settings
from app.errors import Unavailable
from app.group_messages import fan_out_group_message, persist_group_message
from app.messaging import (
    dispatch_private_message, dispatch_private_messages, persist_private_message, persist_private_messages,
)
from app.presence import sweep_presence as sweep_presence_entries
from app.push import (
    COALESCE_KEY, DIGEST_KEY, MISSING, PRIORITY_DIGEST, PRIORITY_GROUP, PRIORITY_PRIVATE, attempt_pushes, mark_queued,
    plan_digest, plan_pushes_many, schedule_once,
)
from app.storage import Storage
from tasks import app
from tasks.batching import ACK, REJECT, REQUEUE, BatchItem, BatchTask

log = logging.getLogger(__name__)

# Transient trouble (database, Redis or broker away): retry with capped
# exponential backoff and jitter, for as long as it takes. Never drop.
TRANSIENT = (DBAPIError, RedisError, BrokerError, ConnectionError, TimeoutError)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=1, retry_backoff_max=30, retry_jitter=True, max_retries=None)

_storage: Storage | None = None
_storage_pid: int | None = None


def storage() -> Storage:
    """This process's Storage (made after fork: connections are not shared)."""
    global _storage, _storage_pid
    if _storage is None or _storage_pid != os.getpid():
        _storage, _storage_pid = Storage(Settings.from_env()), os.getpid()
    return _storage


@worker_process_init.connect
def _fresh_connections(**_):
    global _storage
    _storage = None


# Settings for the batch, read once at import (the worker's environment).
_SETTINGS = Settings.from_env()


# typing=False: the worker calls run(items) with the buffered task messages, while
# callers publish persist_message(messages, attempt=0, alone=False).
@app.task(base=BatchTask, acks_late=True, typing=False, flush_every=_SETTINGS.persist_batch_max,
          flush_interval=_SETTINGS.persist_batch_wait_ms / 1000)
def persist_message(items: list[BatchItem]) -> dict:
    """Store accepted messages, then hand them to dispatch.

    Called as persist_message(messages, attempt=0, alone=False): `messages` is one
    accepted message or a gateway's batch of them. The worker buffers these tasks
    (tasks/batching.py) and runs this once per buffer: the private messages of
    all of them in one transaction and one `dispatch_messages`; a group message
    on its own, fanned out in chunks of members. Returns how each task message
    is settled. A message that fails for good is set aside as a task of its own
    (`alone`), which is dead-lettered when it fails again; the others are kept.
    """
    verdicts = {item.id: _persist_set_aside(item) for item in items if item.kwargs.get("alone")}
    batch = [item for item in items if not item.kwargs.get("alone")]
    if not batch:
        return verdicts
    try:
        verdicts.update(_persist_items(batch))
    except Exception as exc:
        if _transient(exc):  # the database, Redis or broker away: all of them wait and retry
            verdicts.update({item.id: _retry_later(item, exc) for item in batch})
        else:  # something in the batch fails for good: find it, keep the others
            verdicts.update({item.id: _persist_one_by_one(item) for item in batch})
    return verdicts


def _transient(exc: Exception) -> bool:
    # An IntegrityError that persist could not explain is a bug to look at, not an outage to wait out.
    return isinstance(exc, TRANSIENT) and not isinstance(exc, IntegrityError)


def _payloads(item: BatchItem) -> list[dict]:
    messages = item.args[0] if item.args else item.kwargs["messages"]
    return [messages] if isinstance(messages, dict) else list(messages)


def _persist_one_by_one(item: BatchItem) -> str:
    """Each message of a task on its own; one that fails for good is set aside."""
    try:
        for payload in _payloads(item):
            try:
                _persist_items([item._replace(args=[payload], kwargs={})])
            except Exception as exc:
                if _transient(exc):
                    raise
                log.warning("msg %s fails (%s); set aside to be dead-lettered alone", payload.get("msg_id"),
                            exc.__class__.__name__)
                _set_aside(payload, item.routing_key)
    except Exception as exc:
        return _retry_later(item, exc) if _transient(exc) else REQUEUE  # REQUEUE: the broker refused the set-aside
    return ACK


def _persist_set_aside(item: BatchItem) -> str:
    """A message set aside: stored on its own (an id collision raises here), or dead-lettered."""
    try:
        _persist_items([item], strict=True)
        return ACK
    except Exception as exc:
        if _transient(exc):
            return _retry_later(item, exc)
        log.exception("persist_message %s fails for good; dead-lettered for an operator", item.id)
        metrics.TASK_FAILURES.labels("persist_message").inc()
        return REJECT


def _set_aside(payload: dict, routing_key: str | None) -> None:
    persist_message.apply_async(args=[payload], kwargs={"alone": True}, argsrepr=f"[msg {payload.get('msg_id')}]",
                                **_route(routing_key))


def _route(routing_key: str | None) -> dict:
    return {"queue": "group_messages", "routing_key": "group.message"} if routing_key == "group.message" else {}


def _persist_items(items: list[BatchItem], strict: bool = False) -> dict:
    batch = [payload for item in items for payload in _payloads(item)]
    private = [m for m in batch if m.get("group_id") is None]
    # strict: one at a time, and an id collision raises instead of coming back `collided`.
    outcomes = [persist_private_message(storage(), m) for m in private] if strict \
        else persist_private_messages(storage(), private)
    for outcome in outcomes:
        metrics.message_persisted(outcome.stored)
    origins = {str(m["msg_id"]): m.get("origin_conn") for m in private}
    todo = [[str(o.msg_id), origins.get(str(o.msg_id))] for o in outcomes if o.dispatch]
    if len(todo) == 1:
        dispatch_message.apply_async(args=todo[0], argsrepr=f"[{todo[0][0]}]")
    elif todo:
        dispatch_messages.apply_async(args=[todo], argsrepr=f"[{len(todo)} messages: {todo[0][0]} …]")
    for payload, outcome in zip(private, outcomes):
        if outcome.collided:  # alone, it fails and is dead-lettered for an operator (docs/operations.md)
            log.critical("msg %s: its id is taken by another message; set aside", outcome.msg_id)
            _set_aside(payload, "private.message")
    groups = [_persist_group(m) for m in batch if m.get("group_id") is not None]
    log.info("persisted %d message(s) from %d task(s): %d new, %d group", len(batch), len(items),
             sum(o.stored for o in outcomes), len(groups))
    return {item.id: ACK for item in items}


def _retry_later(item: BatchItem, exc: Exception) -> str:
    return retry_later(persist_message, item, exc, "attempt", args=[_payloads(item)],
                       argsrepr="[message payload not shown]", **_route(item.routing_key))


def retry_later(task, item: BatchItem, exc: Exception, counter: str, **publish) -> str:
    """A batch task's message published again after a capped, jittered backoff, its
    kwargs[counter] counting the retries (Celery's retry does the same); REQUEUE when
    the broker refuses that too."""
    number = int(item.kwargs.get(counter) or 0) + 1
    delay = random.uniform(0.5, 1.0) * min(30, 2 ** number)
    kwargs = {key: value for key, value in item.kwargs.items() if key != "messages"}
    try:
        task.apply_async(kwargs={**kwargs, counter: number}, countdown=delay, **publish)
    except Exception:  # the broker is away too: back to the queue as it is
        return REQUEUE
    name = task.name.rsplit(".", 1)[-1]
    log.warning("%s %s: %s (%s); retry %d in %.1f s", name, item.id, exc.__class__.__name__,
                str(getattr(exc, "orig", None) or exc)[:200], number, delay)
    metrics.TASK_RETRIES.labels(name).inc()
    return ACK


def _persist_group(message: dict) -> dict:
    outcome = persist_group_message(storage(), message)
    for number, members in enumerate(outcome.chunks):
        dispatch_group_message.apply_async(
            args=[str(outcome.msg_id), message.get("origin_conn"), [str(uid) for uid in members]],
            argsrepr=f"[{outcome.msg_id}, chunk {number + 1}/{len(outcome.chunks)}, {len(members)} members]")
    log.info("msg %s persisted in group %s (new=%s, %d recipients in %d chunks)", outcome.msg_id,
             message["group_id"], outcome.stored, sum(map(len, outcome.chunks)), len(outcome.chunks))
    return {"msg_id": str(outcome.msg_id), "stored": outcome.stored, "chunks": len(outcome.chunks)}


@app.task(bind=True, acks_late=True, **RETRY)
def dispatch_message(self, msg_id: str, origin_conn: str | None = None) -> dict:
    """Live delivery, unread, offline index; a (coalesced) push for each offline recipient."""
    outcome = dispatch_private_message(storage(), int(msg_id), origin_conn)
    metrics.message_dispatched(outcome)
    # A second run (redelivery or retry) may find a window it claimed but never queued.
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or self.request.retries > 0
    for user_id in outcome.offline_users:
        schedule_push(msg_id, user_id, PRIORITY_PRIVATE, redelivered)
    log.info("msg %s dispatched: %d live connections, %d offline", msg_id, outcome.live_connections,
             len(outcome.offline_users))
    return {"msg_id": msg_id, "live": outcome.live_connections, "offline": [str(u) for u in outcome.offline_users]}


@app.task(bind=True, acks_late=True, **RETRY)
def dispatch_messages(self, batch: list[list]) -> dict:
    """`dispatch_message` for a persist batch: [[msg_id, origin_conn], ...], in one go."""
    outcomes = dispatch_private_messages(storage(), [(int(msg_id), origin) for msg_id, origin in batch])
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or self.request.retries > 0
    for outcome in outcomes:
        metrics.message_dispatched(outcome)
        for user_id in outcome.offline_users:
            schedule_push(str(outcome.msg_id), user_id, PRIORITY_PRIVATE, redelivered)
    log.info("%d messages dispatched (%s …): %d live connections, %d offline", len(outcomes), batch[0][0],
             sum(o.live_connections for o in outcomes), sum(len(o.offline_users) for o in outcomes))
    return {"messages": len(outcomes), "live": sum(o.live_connections for o in outcomes),
            "offline": sum(len(o.offline_users) for o in outcomes)}


@app.task(bind=True, acks_late=True, **RETRY)
def dispatch_group_message(self, msg_id: str, origin_conn: str | None, member_ids: list[str]) -> dict:
    """One chunk of a group message's members: streams, live delivery, unread, offline index, pushes."""
    outcome = fan_out_group_message(storage(), int(msg_id), [int(uid) for uid in member_ids], origin_conn)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or self.request.retries > 0
    for user_id in outcome.offline_users:
        schedule_push(msg_id, user_id, PRIORITY_GROUP, redelivered)
    log.info("msg %s dispatched to %d group members: %d live connections, %d offline", msg_id,
             len(member_ids), outcome.live_connections, len(outcome.offline_users))
    return {"msg_id": msg_id, "live": outcome.live_connections, "offline": len(outcome.offline_users)}


def enqueue(task, args: list, priority: int, countdown: float | None = None, kwargs: dict | None = None) -> None:
    """Publish a push_tasks task at our priority (1-10, higher first).

    RabbitMQ serves higher numbers first; kombu's Redis transport (the
    embedded broker) serves lower numbers first, so there it is mirrored.
    """
    if not storage().settings.broker_is_amqp:
        priority = 10 - priority
    task.apply_async(args=args, kwargs=kwargs, priority=priority, countdown=countdown)


def queue_delivery(push_id: int, priority: int, attempt: int = 0, countdown: float | None = None) -> None:
    """deliver_push(push_id, attempt): the attempt of a push_log row made when it has `attempt` attempts."""
    enqueue(deliver_push, [push_id], priority, countdown=countdown, kwargs={"attempt": attempt})


def schedule_push(msg_id: str, user_id: int, priority: int, redelivered: bool = False) -> None:
    """One send_push per user per coalescing window: a burst becomes one push.

    A redelivered dispatch whose first run died between claiming the window
    and queueing the push finds the claim still "pending" and queues it.
    """
    s, key = storage(), COALESCE_KEY.format(user_id)
    window = s.settings.push_coalesce_seconds
    if schedule_once(s, key, window) or (redelivered and s.redis.get(key) == "pending"):
        enqueue(send_push, [msg_id, str(user_id), priority], priority, countdown=window)
        mark_queued(s, key)


_PUSH_BATCH = dict(base=BatchTask, acks_late=True, flush_every=_SETTINGS.push_batch_max,
                   flush_interval=_SETTINGS.push_batch_wait_ms / 1000,
                   batches_in_flight=_SETTINGS.push_batches_in_flight)


@app.task(**_PUSH_BATCH)
def send_push(items: list[BatchItem]) -> dict:
    """Plan the pushes of offline users (newest unread message, badge) and send them.

    Called as send_push(msg_id, user_id, priority), once per user and
    coalescing window. The worker buffers these tasks (tasks/batching.py) and
    runs this once per buffer: each user's pushes planned (push_log rows), then
    all of them attempted at once, as one `attempt_pushes` (no deliver_push
    task for a first attempt; retries are deliver_push tasks). Returns how each
    task message is settled.
    """
    return _push_batch(send_push, items, _planner_args, _plan_and_send)


def _planner_args(item: BatchItem) -> tuple[str, int]:
    args, kwargs = list(item.args), dict(item.kwargs)
    msg_id = args[0] if args else kwargs["msg_id"]
    user_id = int(args[1] if len(args) > 1 else kwargs["user_id"])
    return str(msg_id), user_id


def _plan_and_send(wanted: dict) -> dict:
    s = storage()
    users = {}  # one plan per user, however many of their tasks the batch holds
    for msg_id, user_id in wanted.values():
        users.setdefault(user_id, msg_id)
    plans = plan_pushes_many(s, list(users))
    todo = [(push_id, 0) for plan in plans for push_id in plan.push_ids]
    if todo:
        attempt_pushes(s, todo, providers(), s.settings.push_max_retries, s.settings.push_retry_base_seconds,
                       before_commit=_queue_retries)
    for plan in plans:
        user_id = str(plan.user_id)
        if plan.digest and schedule_once(s, DIGEST_KEY.format(user_id), s.settings.email_digest_delay_seconds):
            enqueue(send_digest, [user_id], PRIORITY_DIGEST, countdown=s.settings.email_digest_delay_seconds)
            mark_queued(s, DIGEST_KEY.format(user_id))
        if plan.skipped:
            log.info("user %s: no push for msg %s (%s)", user_id, users[plan.user_id], plan.skipped)
    log.info("planned pushes of %d user(s) from %d task(s): %d push(es) sent", len(users), len(wanted), len(todo))
    return {item_id: ACK for item_id in wanted}


def _push_batch(task, items: list[BatchItem], parse, work) -> dict:
    """The verdicts of a push batch: `work` over the parsed items, our own services' trouble retried later,
    a message that fails for good found and dead-lettered."""
    verdicts, wanted = {}, {}
    for item in items:
        try:
            wanted[item.id] = parse(item)
        except (IndexError, KeyError, TypeError, ValueError):
            log.error("%s %s: malformed arguments %r %r; dead-lettered", task.name, item.id, item.args, item.kwargs)
            verdicts[item.id] = REJECT
    if not wanted:
        return verdicts
    try:
        verdicts.update(work(wanted))
    except TRANSIENT as exc:  # the database, Redis or broker away: all of them wait and retry
        verdicts.update({item.id: retry_later(task, item, exc, "retries", args=item.args, priority=item.priority)
                         for item in items if item.id in wanted})
    except Exception:
        name = task.name.rsplit(".", 1)[-1]
        if len(wanted) == 1:
            log.exception("%s %s fails for good; dead-lettered for an operator", name, next(iter(wanted)))
            metrics.TASK_FAILURES.labels(name).inc()
            verdicts[next(iter(wanted))] = REJECT
        else:
            log.exception("%s: a batch of %d failed; trying them one by one", name, len(wanted))
            for item in items:  # find the one that fails for good, do the others
                if item.id in wanted:
                    verdicts.update(task.run([item]))
    return verdicts


@app.task(**_PUSH_BATCH)
def deliver_push(items: list[BatchItem]) -> dict:
    """Attempts of push_log rows; a temporary failure schedules the row's next attempt.

    Called as deliver_push(push_id, attempt=None): `attempt` is the number of
    attempts the row had when this delivery was queued (None, from tasks
    queued before it existed: whatever it has). The worker buffers these tasks
    (tasks/batching.py) and runs this once per buffer: one `attempt_pushes`
    over all of them (one transaction, concurrent APNs requests). Returns how
    each task message is settled.
    """
    return _push_batch(deliver_push, items, _delivery, _deliver)


def _deliver(wanted: dict) -> dict:
    s = storage()
    results = attempt_pushes(s, wanted.values(), providers(), s.settings.push_max_retries,
                             s.settings.push_retry_base_seconds, before_commit=_queue_retries)
    verdicts = {}
    for item_id, (push_id, _) in wanted.items():
        if results[push_id].status == MISSING:
            log.error("deliver_push %s: push %s does not exist; dead-lettered", item_id, push_id)
            metrics.TASK_FAILURES.labels("deliver_push").inc()
            verdicts[item_id] = REJECT
        else:
            verdicts[item_id] = ACK
    stale = sum(r.stale for r in results.values())
    log.info("delivered %d push(es) from %d task(s)%s", len(results) - stale, len(wanted),
             f"; {stale} had nothing to do (already done, or not at that attempt)" if stale else "")
    return verdicts


def _delivery(item: BatchItem) -> tuple[int, int | None]:
    args, kwargs = list(item.args), dict(item.kwargs)
    push_id = int(args[0] if args else kwargs["push_id"])
    attempt = args[1] if len(args) > 1 else kwargs.get("attempt")
    return push_id, None if attempt is None else int(attempt)


def _queue_retries(results: dict) -> None:
    """Before the outcomes commit: the next attempt of each row that failed temporarily."""
    for result in results.values():
        if result.retry_in is not None:
            queue_delivery(result.push_id, result.priority, result.attempts, countdown=result.retry_in)


@app.task(bind=True, acks_late=True, **RETRY)
def send_digest(self, user_id: str) -> dict:
    """The email digest of a user's unread messages, after the quiet delay (and after do-not-disturb hours)."""
    s = storage()
    plan = plan_digest(s, int(user_id))
    if plan.defer_seconds is not None:
        s.redis.expire(DIGEST_KEY.format(user_id), int(plan.defer_seconds) + 3600)  # held until it goes out
        enqueue(send_digest, [user_id], PRIORITY_DIGEST, countdown=plan.defer_seconds)
    if plan.push_id is not None:
        queue_delivery(plan.push_id, PRIORITY_DIGEST)
    return {"user_id": user_id, "push_id": plan.push_id, "deferred_s": plan.defer_seconds}


_providers: dict | None = None
_providers_pid: int | None = None


def providers() -> dict:
    """This process's provider clients; a provider whose settings are missing is left out (logged)."""
    global _providers, _providers_pid
    if _providers is None or _providers_pid != os.getpid():
        from app.providers.apns import ApnsClient
        from app.providers.email import EmailClient
        from app.providers.fcm import FcmClient

        settings = storage().settings
        _providers, _providers_pid = {"email": EmailClient(settings)}, os.getpid()
        for name, client_class in (("apns", ApnsClient), ("fcm", FcmClient)):
            try:
                _providers[name] = client_class(settings)
            except ValueError as exc:
                log.warning("%s pushes disabled: %s", name, exc)
    return _providers


@worker_init.connect
def _preload_push_providers(sender=None, **_):
    """A worker that consumes push_tasks imports the provider modules (httpx, h2, cryptography, pyfcm)
    before it forks its pool: each process then builds its clients at its first push without
    importing them itself (about a second of CPU per process)."""
    consume_from = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consume_from = getattr(consume_from, "consume_from", None)
    if consume_from is None or "push_tasks" in consume_from:
        import app.providers.apns  # noqa: F401
        import app.providers.email  # noqa: F401
        import app.providers.fcm  # noqa: F401


@app.task(acks_late=True, **RETRY)
def purge_synced_offline_index() -> int:
    """Beat job: offline-index rows synced more than OFFLINE_INDEX_RETENTION_DAYS ago."""
    s = storage()
    return maintenance.purge_synced_offline_index(s, s.settings.offline_index_retention_days)


@app.task(acks_late=True, **RETRY)
def purge_push_log() -> int:
    """Beat job: finished push_log rows older than PUSH_LOG_RETENTION_DAYS."""
    s = storage()
    return maintenance.purge_push_log(s, s.settings.push_log_retention_days)


@app.task(acks_late=True, **RETRY)
def reconcile_unread() -> int:
    """Beat job: cached unread counters recounted from MySQL."""
    return maintenance.reconcile_unread(storage())


@app.task(acks_late=True, **RETRY)
def sweep_presence() -> int:
    """Beat job: drop presence entries of crashed gateways."""
    s = storage()
    return sweep_presence_entries(s.redis, s.settings.presence_ttl_seconds)


class PersistPublisher:
    """The gateway's producer of persist_message tasks: Celery's task message, published
    with kombu directly on a connection kept per publishing greenlet, each publish
    confirmed by RabbitMQ. apply_async costs about twice the CPU per publish
    (docs/benchmarks.md), and the gateway publishes for every send."""

    RETRY_DELAYS = (0.0, 0.5)  # a failed connection: reconnect at once, then after 0.5 s, then give up

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._local = threading.local()

    def publish_all(self, payloads: list[dict]) -> None:
        """Publish accepted messages: one task for the private ones, one for the group ones."""
        private = [p for p in payloads if p.get("group_id") is None]
        for batch in (private, [p for p in payloads if p.get("group_id") is not None]):
            if batch:
                self.publish(batch)

    def publish(self, payloads: list[dict]) -> None:
        """Publish accepted messages, all private or all group, as one persist_message task to
        private_messages or group_messages; returns once RabbitMQ confirmed it."""
        first = payloads[0]["msg_id"]
        queue = app.amqp.queues["group_messages" if payloads[0].get("group_id") is not None else "private_messages"]
        message = app.amqp.as_task_v2(
            f"persist-{first}" + (f"-{len(payloads)}" if len(payloads) > 1 else ""), persist_message.name,
            args=[payloads[0] if len(payloads) == 1 else payloads], kwargs={},
            argsrepr=f"[msg {first}]" if len(payloads) == 1 else f"[{len(payloads)} msgs: {first} …]",
            kwargsrepr="{}")
        for delay in (*self.RETRY_DELAYS, None):
            try:
                self._producer().publish(
                    message.body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                    headers=message.headers, serializer="json", delivery_mode=2, retry=False,
                    timeout=self.timeout, confirm_timeout=self.timeout, **message.properties)
                return
            except Exception as exc:
                self._forget_connection()
                if delay is None:
                    log.warning("msgs %s not accepted: broker publish failed (%s)",
                                ", ".join(p["msg_id"] for p in payloads), exc.__class__.__name__)
                    raise Unavailable("message not accepted: the message broker is unavailable; "
                                      "retry with the same client_msg_id") from None
                time.sleep(delay)

    def _producer(self) -> Producer:
        producer = getattr(self._local, "producer", None)
        if producer is None:
            connection = app.connection_for_write()
            connection.ensure_connection(max_retries=1, timeout=self.timeout)
            producer = Producer(connection.channel())
            self._local.connection, self._local.producer = connection, producer
        return producer

    def _forget_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.producer = None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


@worker_ready.connect
def _declare_dead_letter_queue(sender=None, **_):
    """The dead-letter exchange must exist before a task is rejected, or RabbitMQ drops it."""
    if storage().settings.broker_is_amqp:
        with app.connection_for_write() as conn:
            app.conf.dead_letter_queue(conn.default_channel).declare()
