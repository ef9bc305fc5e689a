"""Celery configuration from Settings: the seed's exchanges, queues and routes.

chat.direct   (direct) private.message -> private_messages   persist_message
chat.direct   (direct) group.message   -> group_messages     persist_message (groups)
chat.topic    (topic)  offline.#       -> offline_messages   dispatch_message(s), dispatch_group_message (chunks)
notification.direct    push.task       -> push_tasks         send_push (x-max-priority 10)

With RABBITMQ_QUEUE_TYPE=quorum (a RabbitMQ cluster, DESIGN §9) the same tasks
go to quorum queues, replicated on every node, and two things change
(docs/operations.md, "Running on a cluster"):
- quorum queues have no priorities: push_tasks becomes one queue per priority
  class, push_tasks.high (private, 8-10), push_tasks.normal (group, 5-7) and
  push_tasks.low (digests, 1-4), each consumed on its own, so a private push
  never waits behind a digest backlog;
- countdowns (retries, coalescing windows, digests) use Celery's native delayed
  delivery (the celery_delayed_* quorum queues), which forwards only through
  topic exchanges: the chat and push exchanges are topic exchanges there,
  chat.messages and notification.topic (routing keys unchanged, so they route
  exactly like the direct ones).
"""
from __future__ import annotations

from kombu import Exchange, Queue

from app.config import Settings

chat_direct = Exchange("chat.direct", type="direct", durable=True)
chat_topic = Exchange("chat.topic", type="topic", durable=True)
notification_direct = Exchange("notification.direct", type="direct", durable=True)
# A task that fails for good (a bug, an id collision, a retry that could not be
# published) is rejected into dead_letters instead of vanishing; operators look
# there (Flower, RabbitMQ management) and replay with `flask --app wsgi replay-dead-letters`.
dead_letters = Exchange("dead.letters", type="fanout", durable=True)
_dlx = {"x-dead-letter-exchange": "dead.letters"}

task_queues = (
    Queue("private_messages", chat_direct, routing_key="private.message", durable=True, queue_arguments=_dlx),
    Queue("group_messages", chat_direct, routing_key="group.message", durable=True, queue_arguments=_dlx),
    Queue("offline_messages", chat_topic, routing_key="offline.#", durable=True, queue_arguments=_dlx),
    Queue("push_tasks", notification_direct, routing_key="push.task", durable=True,
          queue_arguments={"x-max-priority": 10, **_dlx}),
)
dead_letter_queue = Queue("dead_letters", dead_letters, durable=True)

# The quorum layout (RABBITMQ_QUEUE_TYPE=quorum, module docstring).
QUORUM = {"x-queue-type": "quorum"}
quorum_chat = Exchange("chat.messages", type="topic", durable=True)
quorum_notification = Exchange("notification.topic", type="topic", durable=True)
# (queue, lowest priority it takes), highest class first.
PUSH_CLASSES = (("push_tasks.high", 8), ("push_tasks.normal", 5), ("push_tasks.low", 0))


def push_route(priority: int) -> dict:
    """The quorum push queue of a push priority (1-10), with its routing key."""
    name = next(name for name, lowest in PUSH_CLASSES if priority >= lowest)
    return {"queue": name, "routing_key": name.replace("_tasks", "")}


quorum_task_queues = (
    Queue("private_messages", quorum_chat, routing_key="private.message", durable=True,
          queue_arguments={**QUORUM, **_dlx}),
    Queue("group_messages", quorum_chat, routing_key="group.message", durable=True, queue_arguments={**QUORUM, **_dlx}),
    Queue("offline_messages", chat_topic, routing_key="offline.#", durable=True, queue_arguments={**QUORUM, **_dlx}),
    *(Queue(name, quorum_notification, routing_key=push_route(lowest)["routing_key"], durable=True,
            queue_arguments={**QUORUM, **_dlx}) for name, lowest in PUSH_CLASSES),
)
quorum_dead_letter_queue = Queue("dead_letters", dead_letters, durable=True, queue_arguments=QUORUM)


def worker_queues(settings: Settings) -> dict[str, str]:
    """The queues of each worker family (DESIGN §7), for `celery worker -Q`."""
    if settings.rabbitmq_queue_type != "quorum":
        return {"persist": "private_messages,group_messages", "dispatch": "offline_messages", "push": "push_tasks"}
    return {"persist": "private_messages,group_messages", "dispatch": "offline_messages",
            "push": ",".join(name for name, _ in PUSH_CLASSES)}


# Routes name the queue (its exchange and type come with it) so the embedded
# Redis broker, which only matches topic keys for declared exchanges, routes
# exactly like RabbitMQ. Task names are stable (explicit name= in tasks/).
_MAINTENANCE = {"queue": "offline_messages", "routing_key": "offline.maintenance"}
_PUSH = {"queue": "push_tasks", "routing_key": "push.task"}
task_routes = {
    "tasks.pipeline.persist_message": {"queue": "private_messages", "routing_key": "private.message"},
    "tasks.pipeline.dispatch_message": {"queue": "offline_messages", "routing_key": "offline.private"},
    "tasks.pipeline.dispatch_messages": {"queue": "offline_messages", "routing_key": "offline.private"},
    "tasks.pipeline.dispatch_group_message": {"queue": "offline_messages", "routing_key": "offline.group"},
    "tasks.pipeline.confirm_live_deliveries": {"queue": "offline_messages", "routing_key": "offline.confirm"},
    "tasks.pipeline.send_push": _PUSH,
    "tasks.pipeline.deliver_push": _PUSH,
    "tasks.pipeline.send_digest": _PUSH,
    "tasks.pipeline.sweep_presence": _MAINTENANCE,
    "tasks.pipeline.purge_synced_offline_index": _MAINTENANCE,
    "tasks.pipeline.purge_push_log": _MAINTENANCE,
    "tasks.pipeline.purge_sessions": _MAINTENANCE,
    "tasks.pipeline.reconcile_unread": _MAINTENANCE,
}

# Housekeeping (each idempotent and bounded per run; visible in Flower like any task).
beat_schedule = {
    "sweep-presence": {"task": "tasks.pipeline.sweep_presence", "schedule": 60.0},
    "purge-synced-offline-index": {"task": "tasks.pipeline.purge_synced_offline_index", "schedule": 3600.0},
    "purge-push-log": {"task": "tasks.pipeline.purge_push_log", "schedule": 3600.0},
    "purge-sessions": {"task": "tasks.pipeline.purge_sessions", "schedule": 3600.0},
    "reconcile-unread": {"task": "tasks.pipeline.reconcile_unread", "schedule": 6 * 3600.0},
    "purge-unreferenced-media": {"task": "tasks.pipeline.purge_unreferenced_media", "schedule": 3600.0},
}


def from_settings(settings: Settings) -> dict:
    """Every Celery setting of NetherLink, for `app.conf.update`."""
    if settings.broker_is_amqp:
        # The gateway's ack means durable: each publish waits for RabbitMQ's confirm.
        transport_options = {"confirm_publish": True}
    else:
        # Embedded default (bundled Redis as broker): emulate priorities and give
        # unacked messages back after an hour.
        transport_options = {"visibility_timeout": 3600, "priority_steps": list(range(11)),
                             "queue_order_strategy": "priority"}
    quorum = settings.rabbitmq_queue_type == "quorum"
    routes = task_routes
    if quorum:
        # A push task's queue depends on its priority (tasks/publish.py passes it); the
        # route here is the default for a task published without one.
        routes = {name: push_route(10) if route is _PUSH else route for name, route in task_routes.items()}
    cluster = dict(
        worker_consumer="tasks.cluster_consumer:ClusterConsumer",
        # A worker's remote-control queue is exclusive by default: one that reconnects to
        # another node within milliseconds of losing its own finds the queue still locked by
        # its dead connection and exits (RESOURCE_LOCKED). Not exclusive, it is re-declared
        # and expires 10 s after its last consumer is gone.
        control_queue_exclusive=False,
    ) if quorum else {}
    return dict(
        **cluster,
        broker_url=settings.broker_url,
        result_backend=_result_backend(settings),
        result_backend_transport_options=(
            {"master_name": settings.redis_sentinel_master} if settings.redis_sentinels else {}),
        # Nothing waits on results, and a task must never depend on Redis being up to
        # run: with results (or STARTED tracking) on, an unreachable Redis makes the
        # worker ack a task without running it. Flower works from task events.
        result_expires=3600,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_queues=quorum_task_queues if quorum else task_queues,
        dead_letter_queue=quorum_dead_letter_queue if quorum else dead_letter_queue,
        task_routes=routes,
        task_default_queue="offline_messages",
        task_default_exchange="chat.topic",
        task_default_routing_key="offline.default",
        # A message is acknowledged only after its task finished; a worker that dies
        # mid-task (even SIGKILL) leaves it to be redelivered. Tasks are idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,  # a failed task is rejected (dead-lettered), not acked away
        # One message in flight per process: a crash redelivers little, and a slow
        # task does not hold others hostage behind it.
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_delivery_mode="persistent",
        # Flower sees every task from the workers' events. No "sent" events: each
        # would be one more confirmed publish on the gateway's path to the ack.
        worker_send_task_events=True,
        task_send_sent_event=False,
        task_track_started=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=4,
        broker_heartbeat=30,
        broker_pool_limit=16,
        broker_transport_options=transport_options,
        # Several nodes in BROKER_URL (';'-separated): a lost connection moves on to the next.
        broker_failover_strategy="round-robin",
        # Quorum queues take no channel-wide prefetch: Celery sees them and uses
        # per-consumer prefetch, and publishes countdowns through its delayed queues
        # (the defaults, spelt out as the cluster relies on them).
        worker_detect_quorum_queues=True,
        broker_native_delayed_delivery_queue_type="quorum",
        beat_schedule=beat_schedule,
        timezone="UTC",
    )


def _result_backend(settings: Settings) -> str:
    """Celery's result backend: REDIS_URL, or Celery's sentinel:// backend listing every
    sentinel (with REDIS_URL's db and password) when REDIS_SENTINELS is set."""
    if not settings.redis_sentinels:
        return settings.redis_url
    from redis.connection import parse_url

    url = parse_url(settings.redis_url)
    auth = f":{url['password']}@" if url.get("password") else ""
    return ";".join(f"sentinel://{auth}{host}:{port}/{url.get('db', 0)}" for host, port in settings.sentinel_addresses)
