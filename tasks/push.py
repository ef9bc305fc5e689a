"""The push tasks on push_tasks: send_push (plan and first attempts), deliver_push
(retries), send_digest (email digests). Thin adapters over app.push."""
from __future__ import annotations

import logging

from celery.signals import worker_init

from app import metrics
from app.push.attempts import MISSING, attempt_pushes
from app.push.badges import plan_badge_syncs
from app.push.providers import BADGE_SYNC
from app.push.planning import (
    COALESCE_KEY, DIGEST_KEY, PRIORITY_DIGEST, mark_queued, plan_digest, plan_pushes, schedule_once,
)
from tasks import app
from tasks.batching import ACK, REJECT, RETRY, BatchItem, BatchTask, dead_letter, retry_later, settle_batch
from tasks.publish import DELIVER_PUSH, SEND_DIGEST, SEND_PUSH, queue_push_delivery, queue_push_task
from tasks.runtime import providers, settings, storage

log = logging.getLogger(__name__)

def schedule_push(msg_id: str, user_id: int, priority: int, redelivered: bool = False) -> None:
    """One send_push per user per coalescing window: a burst becomes one push.

    A redelivered dispatch whose first run died between claiming the window
    and queueing the push finds the claim still "pending" and queues it.
    """
    s, key = storage(), COALESCE_KEY.format(user_id)
    window = s.settings.push_coalesce_seconds
    if schedule_once(s, key, window) or (redelivered and s.redis.get(key) == "pending"):
        queue_push_task(SEND_PUSH, [msg_id, str(user_id), priority], priority, countdown=window)
        mark_queued(s, key)


_PUSH_BATCH = dict(base=BatchTask, acks_late=True, flush_every=settings().push_batch_max,
                   flush_interval=settings().push_batch_wait_ms / 1000,
                   batches_in_flight=settings().push_batches_in_flight)


@app.task(name=SEND_PUSH, **_PUSH_BATCH)
def send_push(items: list[BatchItem]) -> dict:
    """Plan the pushes of offline users (newest unread message, badge) and send them.

    Called as send_push(msg_id, user_id, priority), once per user and
    coalescing window. The worker buffers these tasks (tasks/batching.py) and
    runs this once per buffer: each user's pushes planned (push_log rows), then
    all of them attempted at once, as one `attempt_pushes` (no deliver_push
    task for a first attempt; retries are deliver_push tasks). Returns how each
    task message is settled.

    Called as send_push(msg_id, user_id, priority, kind="badge_sync") after a read or a recall
    (tasks.publish.queue_badge_syncs), it plans that user's badge sync instead (silent pushes
    with the new badge and the notifications to withdraw, app.push.badges), in the same batch.
    """
    return _push_batch(send_push, items, _planner_args, _plan_and_send)


def _planner_args(item: BatchItem) -> tuple[str, int, str]:
    args, kwargs = list(item.args), dict(item.kwargs)
    msg_id = args[0] if args else kwargs["msg_id"]
    user_id = int(args[1] if len(args) > 1 else kwargs["user_id"])
    kind = kwargs.get("kind") or "message"
    if kind not in ("message", BADGE_SYNC):
        raise ValueError(f"unknown send_push kind {kind!r}")
    return str(msg_id), user_id, kind


def _plan_and_send(wanted: dict) -> dict:
    s = storage()
    users, syncs = {}, {}  # one plan per user, however many of their tasks the batch holds
    for msg_id, user_id, kind in wanted.values():
        if kind == BADGE_SYNC:
            syncs.setdefault(user_id, int(msg_id))
        else:
            users.setdefault(user_id, msg_id)
    plans = plan_pushes(s, list(users))
    sync_plans = plan_badge_syncs(s, syncs)
    todo = [(push_id, 0) for plan in plans + sync_plans for push_id in plan.push_ids]
    if todo:
        attempt_pushes(s, todo, providers(), s.settings.push_max_retries, s.settings.push_retry_base_seconds,
                       before_commit=_queue_retries)
    for plan in plans:
        user_id = str(plan.user_id)
        if plan.digest and schedule_once(s, DIGEST_KEY.format(user_id), s.settings.email_digest_delay_seconds):
            queue_push_task(SEND_DIGEST, [user_id], PRIORITY_DIGEST, countdown=s.settings.email_digest_delay_seconds)
            mark_queued(s, DIGEST_KEY.format(user_id))
        if plan.skipped:
            log.info("user %s: no push for msg %s (%s)", user_id, users[plan.user_id], plan.skipped)
    for plan in sync_plans:
        if plan.skipped:
            log.info("user %s: no badge sync for msg %s (%s)", plan.user_id, syncs[plan.user_id], plan.skipped)
    log.info("planned pushes of %d user(s) and badge syncs of %d from %d task(s): %d push(es) sent",
             len(users), len(syncs), len(wanted), len(todo))
    return {item_id: ACK for item_id in wanted}


def _push_batch(task, items: list[BatchItem], parse, work) -> dict:
    """The verdicts of a push batch: `work` over the parsed items, settled by the shared policy
    (tasks.batching.settle_batch); malformed arguments are dead-lettered at once."""
    verdicts, wanted = {}, {}
    for item in items:
        try:
            wanted[item.id] = parse(item)
        except (IndexError, KeyError, TypeError, ValueError):
            log.error("%s %s: malformed arguments %r %r; dead-lettered", task.name, item.id, item.args, item.kwargs)
            verdicts[item.id] = REJECT
    name = task.name.rsplit(".", 1)[-1]
    verdicts.update(settle_batch(
        name, [item for item in items if item.id in wanted],
        work=lambda batch: work({item.id: wanted[item.id] for item in batch}),
        retry=lambda item, exc: retry_later(task, item, exc, "retries", args=item.args, priority=item.priority),
        give_up=lambda item: dead_letter(name, item)))
    return verdicts


@app.task(name=DELIVER_PUSH, **_PUSH_BATCH)
def deliver_push(items: list[BatchItem]) -> dict:
    """Attempts of push_log rows; a temporary failure schedules the row's next attempt.

    Called as deliver_push(push_id, attempt=None): `attempt` is the number of
    attempts the row had when this delivery was queued (None, from tasks
    queued before it existed: whatever it has). The worker buffers these tasks
    (tasks/batching.py) and runs this once per buffer: one `attempt_pushes`
    over all of them (one transaction, concurrent APNs requests). Returns how
    each task message is settled.
    """
    return _push_batch(deliver_push, items, _delivery_args, _attempt_deliveries)


def _attempt_deliveries(wanted: dict) -> dict:
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


def _delivery_args(item: BatchItem) -> tuple[int, int | None]:
    args, kwargs = list(item.args), dict(item.kwargs)
    push_id = int(args[0] if args else kwargs["push_id"])
    attempt = args[1] if len(args) > 1 else kwargs.get("attempt")
    return push_id, None if attempt is None else int(attempt)


def _queue_retries(results: dict) -> None:
    """Before the outcomes commit: the next attempt of each row that failed temporarily."""
    for result in results.values():
        if result.retry_in is not None:
            queue_push_delivery(result.push_id, result.priority, result.attempts, countdown=result.retry_in)


@app.task(name=SEND_DIGEST, bind=True, acks_late=True, **RETRY)
def send_digest(self, user_id: str) -> dict:
    """The email digest of a user's unread messages, after the quiet delay (and after do-not-disturb hours)."""
    s = storage()
    plan = plan_digest(s, int(user_id))
    if plan.defer_seconds is not None:
        s.redis.expire(DIGEST_KEY.format(user_id), int(plan.defer_seconds) + 3600)  # held until it goes out
        queue_push_task(SEND_DIGEST, [user_id], PRIORITY_DIGEST, countdown=plan.defer_seconds)
    if plan.push_id is not None:
        queue_push_delivery(plan.push_id, PRIORITY_DIGEST)
    return {"user_id": user_id, "push_id": plan.push_id, "deferred_s": plan.defer_seconds}


@worker_init.connect
def _preload_push_providers(sender=None, **_):
    """A worker that consumes push_tasks imports the provider modules (httpx, h2, cryptography, pyfcm)
    before it forks its pool: each process then builds its clients at its first push without
    importing them itself (about a second of CPU per process)."""
    consume_from = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consume_from = getattr(consume_from, "consume_from", None)
    if consume_from is None or any(name.startswith("push_tasks") for name in consume_from):
        import app.push.providers.apns  # noqa: F401
        import app.push.providers.email  # noqa: F401
        import app.push.providers.fcm  # noqa: F401
        import app.push.providers.webpush  # noqa: F401
