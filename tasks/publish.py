"""Publishing to the pipeline without loading the task definitions.

The gateway publishes every accepted message here (`PersistPublisher`), and
REST and the CLI queue push deliveries (`queue_push_delivery`); both go by
task name through tasks.app, so neither process imports tasks.messages or
tasks.push (their signals and provider preloads belong to workers).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kombu import Producer

from app.errors import Unavailable
from celeryconfig import push_route
from tasks import app
from tasks.runtime import settings

log = logging.getLogger(__name__)

PERSIST_MESSAGE = "tasks.pipeline.persist_message"
DELIVER_PUSH = "tasks.pipeline.deliver_push"
SEND_PUSH = "tasks.pipeline.send_push"
SEND_DIGEST = "tasks.pipeline.send_digest"


def push_priority(priority: int) -> int:
    """Our push priority (1-10, higher first) as the broker wants it.

    RabbitMQ serves higher numbers first; kombu's Redis transport (the embedded
    broker) serves lower numbers first, so there it is mirrored.
    """
    return priority if settings().broker_is_amqp else 10 - priority


def queue_push_task(name: str, args: list, priority: int, countdown: float | None = None,
                    kwargs: dict | None = None) -> None:
    """Publish a push_tasks task by name at our priority: on quorum queues, to the queue
    of its priority class (celeryconfig.PUSH_CLASSES), as they have no priorities."""
    route = push_route(priority) if settings().rabbitmq_queue_type == "quorum" else {}
    app.send_task(name, args=args, kwargs=kwargs, priority=push_priority(priority), countdown=countdown, **route)


def queue_push_delivery(push_id: int, priority: int, attempt: int = 0, countdown: float | None = None) -> None:
    """deliver_push(push_id, attempt): the attempt of a push_log row made when it has `attempt` attempts."""
    queue_push_task(DELIVER_PUSH, [push_id], priority, countdown=countdown, kwargs={"attempt": attempt})


def queue_badge_syncs(storage, user_ids, msg_id: int) -> list[int]:
    """After a read or a recall (msg_id): a badge sync for each of these users whose devices show a
    notification of ours, unless one is already queued for their window; the users it was queued for.

    It is send_push with kind "badge_sync", so it rides the push worker's batches with the
    notifications; the planner runs when the window closes (app.push.badges).
    """
    from app.push.badges import BADGE_SYNC_KEY, PRIORITY_BADGE_SYNC, claim_badge_syncs
    from app.push.planning import mark_queued

    users = claim_badge_syncs(storage, user_ids)
    window = storage.settings.push_badge_coalesce_seconds
    for user_id in users:
        queue_push_task(SEND_PUSH, [str(msg_id), str(user_id), PRIORITY_BADGE_SYNC], PRIORITY_BADGE_SYNC,
                        countdown=window, kwargs={"kind": "badge_sync"})
        mark_queued(storage, BADGE_SYNC_KEY.format(user_id))
    return users


class PersistPublisher:
    """The gateway's producer of persist_message tasks: Celery's task message, published
    with kombu directly on a connection kept per publishing greenlet, each publish
    confirmed by RabbitMQ. apply_async costs about twice the CPU per publish
    (docs/benchmarks.md), and the gateway publishes for every send."""

    RETRY_DELAYS = (0.0, 0.5)  # a failed connection: reconnect at once, then after 0.5 s, then give up

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._local = threading.local()

    def publish_all(self, payloads: list[dict], deadline: float | None = None,
                    may_start: Callable[[], bool] | None = None) -> None:
        """Publish accepted messages: one task for the private ones, one for the group ones;
        returns once RabbitMQ confirmed them, raises Unavailable otherwise. No attempt starts
        after `deadline` (time.time()), nor connects past it, and none is sent unless
        `may_start()` says so right before it: the gateways' risk window after a Redis loss
        counts on it (app/chat/recovery.py, grace_ms)."""
        private = [p for p in payloads if p.get("group_id") is None]
        for batch in (private, [p for p in payloads if p.get("group_id") is not None]):
            if batch:
                self.publish(batch, deadline, may_start)

    def publish(self, payloads: list[dict], deadline: float | None = None,
                may_start: Callable[[], bool] | None = None) -> None:
        """Publish accepted messages, all private or all group, as one persist_message task to
        private_messages or group_messages; returns once RabbitMQ confirmed it."""
        first = payloads[0]["msg_id"]
        queue = "group_messages" if payloads[0].get("group_id") is not None else "private_messages"
        self._send(queue, f"persist-{first}" + (f"-{len(payloads)}" if len(payloads) > 1 else ""),
                   [payloads[0] if len(payloads) == 1 else payloads], {},
                   f"[msg {first}]" if len(payloads) == 1 else f"[{len(payloads)} msgs: {first} …]",
                   ", ".join(p["msg_id"] for p in payloads), deadline, may_start)

    def probe(self, queue: str, timestamp: int) -> None:
        """An empty persist_message task on `queue`, claimed at `timestamp`: once a persist worker
        received it, everything queued before it was delivered (app/chat/recovery.py)."""
        self._send(queue, f"probe-{queue}-{timestamp}", [[]], {"probe": timestamp}, "[probe]", "probe",
                   time.time() + self.timeout)

    def _send(self, queue_name: str, task_id: str, args: list, kwargs: dict, argsrepr: str, what: str,
              deadline: float | None, may_start: Callable[[], bool] | None = None) -> None:
        queue = app.amqp.queues[queue_name]
        message = app.amqp.as_task_v2(task_id, PERSIST_MESSAGE, args=args, kwargs=kwargs, argsrepr=argsrepr,
                                      kwargsrepr="{}" if not kwargs else repr(kwargs))
        for delay in (*self.RETRY_DELAYS, None):
            try:
                if deadline is not None and time.time() >= deadline:
                    raise TimeoutError("publish deadline passed")
                producer = self._producer(deadline)
                if may_start is not None and not may_start():
                    log.warning("msgs %s not published: Redis lost its memory since their claim, or does not "
                                "answer", what)
                    raise Unavailable("message not accepted: the server restarted part of its state; "
                                      "retry with the same client_msg_id")
                producer.publish(
                    message.body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                    headers=message.headers, serializer="json", delivery_mode=2, retry=False,
                    timeout=self.timeout, confirm_timeout=self.timeout, **message.properties)
                return
            except Unavailable:
                raise
            except Exception as exc:
                self._forget_connection()
                if delay is None or (deadline is not None and time.time() + delay >= deadline):
                    log.warning("msgs %s not accepted: broker publish failed (%s)", what, exc.__class__.__name__)
                    raise Unavailable("message not accepted: the message broker is unavailable; "
                                      "retry with the same client_msg_id") from None
                time.sleep(delay)

    def _producer(self, deadline: float | None = None) -> Producer:
        producer = getattr(self._local, "producer", None)
        if producer is None:
            timeout = self.timeout if deadline is None else max(0.05, min(self.timeout, deadline - time.time()))
            connection = app.connection_for_write()
            connection.ensure_connection(max_retries=1, timeout=timeout)
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
