"""Consumer-side batching (persist_message, deliver_push), with our delivery guarantees.

The worker buffers the task messages it receives and runs the task once per
buffer. With `flush_interval` 0 a message that finds a pool process free
goes at once; otherwise a buffer goes when `flush_every` messages are there
or `flush_interval` seconds after its first one. While every pool process is
busy with a batch of this task, a buffer that is not full waits for one of
them to finish (it could only queue behind them), so under load batches grow
by themselves: one run stores hundreds of messages in one transaction, and
at low load nothing waits. (The idea of celery-batches, which pins
celery < 5.7 and acks every message of a batch whatever happened to it.)

The task's run(items) gets BatchItems and returns a verdict per item id; the
worker's main process settles each task message by it: ACK (stored, or
queued again with a delay as a new message, which is how Celery retries),
REJECT (fails for good: RabbitMQ moves it to the dead-letter queue) or
REQUEUE (given back as it is). Messages stay unacknowledged until then, and
a pool process that dies mid-batch gives every message of its batch back,
so a killed worker loses nothing.
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Callable, NamedTuple

from celery import Task, signals
from celery.utils.time import timezone
from celery.worker.request import Request, create_request_cls
from kombu.asynchronous.timer import to_timestamp
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, IntegrityError

from app import metrics

log = logging.getLogger(__name__)

ACK, REQUEUE, REJECT = "ack", "requeue", "reject"

# Transient trouble (database, Redis or broker away): retry with capped
# exponential backoff and jitter, for as long as it takes. Never drop.
TRANSIENT = (DBAPIError, RedisError, BrokerError, ConnectionError, TimeoutError)
RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=1, retry_backoff_max=30, retry_jitter=True, max_retries=None)


class BatchItem(NamedTuple):
    """What a batch run sees of one task message (picklable, for the pool)."""

    id: str
    args: list
    kwargs: dict
    routing_key: str | None
    priority: int | None = None  # the message's priority as the broker got it (re-publish it with this)


class BatchTask(Task):
    """Subclass and implement run(items: list[BatchItem]) -> {item id: ACK | REQUEUE | REJECT}."""

    abstract = True
    flush_every = 100
    flush_interval = 0.01
    # How many full batches the worker may hold unacknowledged at once (buffered
    # or running in pool processes), on top of its usual prefetch.
    batches_in_flight = 1
    # The messages carry the task's call arguments (persist_message(messages,
    # attempt=0), deliver_push(push_id, attempt=None)), not run(items)'s: Celery
    # must not check the arguments of apply_async against run().
    typing = False
    # persist_message: the worker reports what it holds (tasks/persist_progress.py) for the
    # gateways' risk window after a Redis loss.
    track_progress = False

    def Strategy(self, task, app, consumer):
        tracker = _progress_tracker(self, app, consumer) if self.track_progress else None
        buffer: list[Request] = []
        flush_timer = [None]
        Req = create_request_cls(Request, task, consumer.pool, consumer.hostname, consumer.event_dispatcher, app=app)
        eventer = consumer.event_dispatcher
        send_events = bool(eventer and eventer.enabled and task.send_events)
        window_raised = [False]
        running = [0]  # batches of this task handed to the pool and not settled yet
        processes = max(1, int(getattr(consumer.pool, "limit", None) or 1))

        def flush() -> None:
            if flush_timer[0] is not None:
                flush_timer[0].cancel()
                flush_timer[0] = None
            # While all processes are busy a buffer that is not full keeps filling; the next
            # batch to finish flushes it. A batch is never more than flush_every messages.
            while buffer and (running[0] < processes or len(buffer) >= self.flush_every):
                batch = buffer[:self.flush_every]
                del buffer[:self.flush_every]
                running[0] += 1
                self._run_in_pool(consumer.pool, batch, eventer if send_events else None, done, tracker)

        def done() -> None:  # in the main process, after a batch was settled (or lost)
            running[0] -= 1
            if buffer:  # a process is free: what waited goes now
                flush()

        def add(request: Request) -> None:
            buffer.append(request)
            if len(buffer) >= self.flush_every:
                flush()
            elif not self.flush_interval and running[0] < processes:
                # flush_interval 0: a message that finds a process free goes on the loop's next turn,
                # with whatever arrived in the same read: copies of one send delivered together
                # (after a Redis loss, docs/reliability.md) are stored in order, in one batch.
                if flush_timer[0] is None:
                    flush_timer[0] = consumer.timer.call_after(0, flush)
            elif flush_timer[0] is None and self.flush_interval:
                flush_timer[0] = consumer.timer.call_after(self.flush_interval, flush)

        def released(request: Request) -> None:  # a delayed retry whose time has come
            consumer.qos.decrement_eventually()
            add(request)

        def on_message(message, body, ack, reject, callbacks, **_):
            if not window_raised[0]:  # (no QoS yet when strategies are made)
                # The worker must be allowed to hold whole batches unacknowledged:
                # `batches_in_flight` batches more than its prefetch (which stays 1 per
                # process for other tasks).
                consumer.qos.increment_eventually(self.flush_every * max(1, self.batches_in_flight))
                window_raised[0] = True
            request = Req(message, on_ack=ack, on_reject=reject, app=app, hostname=consumer.hostname,
                          eventer=eventer, task=task, connection_errors=consumer.connection_errors,
                          body=message.body, headers=message.headers, decoded=False, utc=app.uses_utc_timezone())
            signals.task_received.send(sender=consumer, request=request)
            if tracker is not None:
                tracker.received(request.id, (message.delivery_info or {}).get("routing_key"), request.args,
                                 request.kwargs)
            if request.eta:  # held, not buffered, until due; it must not hold the prefetch window
                # The worker's timer runs on the monotonic clock: to_timestamp converts (as Celery's own
                # strategy does); a wall-clock timestamp here would hold the task for decades.
                eta = to_timestamp(timezone.to_system(request.eta)) if request.utc else \
                    to_timestamp(request.eta, app.timezone)
                consumer.qos.increment_eventually()
                consumer.timer.call_at(eta, released, (request,), priority=6)
            else:
                add(request)

        return on_message

    def _run_in_pool(self, pool, requests: list[Request], eventer=None, done=lambda: None, tracker=None) -> None:
        started = time.monotonic()
        items = [BatchItem(r.id, list(r.args), dict(r.kwargs), (r.delivery_info or {}).get("routing_key"),
                           (r.delivery_info or {}).get("priority")) for r in requests]
        # Flower sees one task per batch: two events per message, each a confirmed publish,
        # held the worker's main loop for about as long as the batch's own work.
        batch_id = f"batch-{uuid.uuid4()}"
        if eventer is not None:
            shown = ", ".join(r.id for r in requests[:5]) + (" …" if len(requests) > 5 else "")
            eventer.send("task-received", uuid=batch_id, name=self.name, args=f"[batch of {len(requests)}: {shown}]",
                         kwargs="{}", root_id=batch_id, parent_id=None, retries=0, eta=None)

        def settle(verdicts) -> None:
            try:
                if not isinstance(verdicts, dict):  # a bug in the batch: never ack what may not be stored
                    log.error("%s: batch of %d returned no verdict; giving the messages back", self.name,
                              len(requests))
                    verdicts = {}
                runtime = time.monotonic() - started
                counts = {ACK: 0, REQUEUE: 0, REJECT: 0}
                for request in requests:
                    verdict = verdicts.get(request.id, REQUEUE)
                    counts[verdict] = counts.get(verdict, 0) + 1
                    if verdict == ACK:
                        request.acknowledge()
                    else:
                        if tracker is not None and verdict == REQUEUE:
                            tracker.given_back(request.id)
                        request.reject(requeue=verdict == REQUEUE)
                    if tracker is not None:
                        tracker.settled(request.id)
                        if eventer is not None:  # a message given back or dead-lettered: Flower shows it by id
                            eventer.send("task-failed", uuid=request.id, name=self.name, args=request.argsrepr,
                                         exception=f"{verdict} (in {batch_id})", traceback="")
                if eventer is not None:
                    eventer.send("task-succeeded", uuid=batch_id, runtime=runtime,
                                 result=f"{counts[ACK]} acked, {counts[REQUEUE]} given back, "
                                        f"{counts[REJECT]} dead-lettered")
            finally:
                done()

        def lost(exc_info) -> None:  # the pool process died (SIGKILL, OOM): redeliver
            try:
                log.error("%s: batch of %d lost with its process (%s); giving the messages back", self.name,
                          len(requests), getattr(exc_info, "exception", exc_info))
                for request in requests:
                    if tracker is not None:
                        tracker.given_back(request.id)
                    request.reject(requeue=True)
                if eventer is not None:
                    eventer.send("task-failed", uuid=batch_id, exception="its pool process was lost; "
                                 "every message given back to the queue", traceback="")
            finally:
                done()

        pool.apply_async(run_batch, (self.name, items), callback=settle, error_callback=lost)


_trackers: dict = {}  # task name -> PersistProgress, one per worker main process


def _progress_tracker(task, app, consumer):
    """The task's tracker, reporting on the consumer's timer. Strategies are made at every
    consumer start: a restart (a lost broker connection) means the broker took back what the
    old consumer held."""
    from app.chat.recovery import REPORT_INTERVAL, grace_ms
    from tasks.persist_progress import PersistProgress
    from tasks.runtime import settings

    tracker = _trackers.get(task.name)
    if tracker is None:
        queues = list(app.amqp.queues.consume_from or app.amqp.queues)
        tracker = _trackers[task.name] = PersistProgress(settings(),
                                                         grace_ms(), queues)
    else:
        tracker.restart()
    consumer.timer.call_repeatedly(REPORT_INTERVAL, tracker.report)
    return tracker


def run_batch(task_name: str, items: list[BatchItem]):
    """In the pool process: the task's run over the batch, with the usual task signals."""
    from tasks import app

    task, task_id = app.tasks[task_name], f"batch-{uuid.uuid4()}"
    signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=items, kwargs={})
    verdicts = None
    try:
        verdicts = task.run(items)
        return verdicts
    except Exception:
        log.exception("%s: batch of %d failed; giving the messages back", task_name, len(items))
        return None
    finally:
        signals.task_postrun.send(sender=task, task_id=task_id, task=task, args=items, kwargs={}, retval=verdicts,
                                  state="SUCCESS" if verdicts is not None else "FAILURE")


def is_transient(exc: BaseException) -> bool:
    """Our own services' trouble, to wait out. An IntegrityError nothing explained is a bug
    to look at, not an outage."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, IntegrityError)


def settle_batch(name: str, items: list[BatchItem], work: Callable[[list[BatchItem]], dict],
                 retry: Callable[[BatchItem, Exception], str], give_up: Callable[[BatchItem], str]) -> dict:
    """The verdicts of one batch run, the policy every batch task shares.

    `work(items)` does the batch and returns its verdicts. When it raises: our
    own services' trouble (is_transient) retries every item later (`retry`);
    anything else is a message that fails for good, so each item is tried on
    its own and the one that still fails is settled by `give_up` (quarantined
    or dead-lettered), while the others are done.
    """
    try:
        return work(items)
    except Exception as exc:
        if is_transient(exc):
            return {item.id: retry(item, exc) for item in items}
        if len(items) == 1:
            return {items[0].id: give_up(items[0])}
        log.exception("%s: a batch of %d failed; trying them one by one", name, len(items))
    verdicts = {}
    for item in items:
        verdicts.update(settle_batch(name, [item], work, retry, give_up))
    return verdicts


def dead_letter(name: str, item: BatchItem) -> str:
    """A task message that fails for good: REJECT, which RabbitMQ moves to dead_letters."""
    log.exception("%s %s fails for good; dead-lettered for an operator", name, item.id)
    metrics.TASK_FAILURES.labels(name).inc()
    return REJECT


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
