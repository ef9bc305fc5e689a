"""The message tasks: persist_message (private_messages, group_messages) and
dispatch_message(s) / dispatch_group_message (offline_messages).

Thin adapters over app.chat.persist, app.chat.dispatch and app.chat.group_messages:
they decode the task message, call the domain function, and queue the next step
after its commit. Each is idempotent and safe to redeliver; task names are stable.
"""
from __future__ import annotations

import logging
import time

from app import metrics
from app.chat.confirm import await_confirmation, rearm_sweep, settle_due
from app.chat.dispatch import dispatch_private_messages
from app.chat.group_messages import fan_out_group_message, persist_group_message
from app.chat.persist import persist_private_message, persist_private_messages
from app.chat.recovery import record_reissue
from app.push.planning import PRIORITY_GROUP, PRIORITY_PRIVATE
from tasks import app
from tasks.batching import ACK, REJECT, REQUEUE, RETRY, BatchItem, BatchTask, is_transient, retry_later, settle_batch
from tasks.push import schedule_push
from tasks.runtime import settings, storage

log = logging.getLogger(__name__)


# typing=False: the worker calls run(items) with the buffered task messages, while
# callers publish persist_message(messages, attempt=0, quarantined=False).
@app.task(name="tasks.pipeline.persist_message", base=BatchTask, acks_late=True, typing=False, track_progress=True,
          flush_every=settings().persist_batch_max, flush_interval=settings().persist_batch_wait_ms / 1000)
def persist_message(items: list[BatchItem]) -> dict:
    """Store accepted messages, then hand them to dispatch.

    Called as persist_message(messages, attempt=0, quarantined=False): `messages` is
    one accepted message or a gateway's batch of them. The worker buffers these tasks
    (tasks/batching.py) and runs this once per buffer: the private messages of all of
    them in one transaction and one `dispatch_messages`; a group message on its own,
    fanned out in chunks of members. Returns how each task message is settled. A
    message that fails for good is quarantined as a task of its own, which is
    dead-lettered when it fails again; the others are kept.
    """
    verdicts = {item.id: ACK for item in items if "probe" in item.kwargs}  # its receipt was the point
    verdicts.update({item.id: _persist_quarantined(item) for item in items if _is_quarantined(item)})
    batch = [item for item in items if not _is_quarantined(item) and "probe" not in item.kwargs]
    if batch:
        verdicts.update(settle_batch("persist_message", batch, _persist_items, _retry_later, _quarantine_failing))
    return verdicts


def _is_quarantined(item: BatchItem) -> bool:
    return bool(item.kwargs.get("quarantined") or item.kwargs.get("alone"))  # "alone": its name before 2026-12


def _payloads(item: BatchItem) -> list[dict]:
    messages = item.args[0] if item.args else item.kwargs["messages"]
    return [messages] if isinstance(messages, dict) else list(messages)


def _quarantine_failing(item: BatchItem) -> str:
    """Each message of a task that failed for good, on its own; one that fails again is quarantined."""
    try:
        for payload in _payloads(item):
            try:
                _persist_items([item._replace(args=[payload], kwargs={})])
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.warning("msg %s fails (%s); quarantined, to be dead-lettered alone", payload.get("msg_id"),
                            exc.__class__.__name__)
                _quarantine(payload, item.routing_key)
    except Exception as exc:
        return _retry_later(item, exc) if is_transient(exc) else REQUEUE  # REQUEUE: the broker refused it
    return ACK


def _persist_quarantined(item: BatchItem) -> str:
    """A quarantined message: stored on its own (an id collision raises here), or dead-lettered."""
    try:
        _persist_items([item], strict=True)
        return ACK
    except Exception as exc:
        if is_transient(exc):
            return _retry_later(item, exc)
        log.exception("persist_message %s fails for good; dead-lettered for an operator", item.id)
        metrics.TASK_FAILURES.labels("persist_message").inc()
        return REJECT


def _quarantine(payload: dict, routing_key: str | None) -> None:
    persist_message.apply_async(args=[payload], kwargs={"quarantined": True},
                                argsrepr=f"[msg {payload.get('msg_id')}]", **_route(routing_key))
    _record_reissue([payload])  # (raises when Redis does not answer: the task is then retried)


def _record_reissue(payloads: list[dict]) -> None:
    """A message went back to a queue as a new task: before its old task is acked, so the
    gateways' risk window after a Redis loss (app/chat/recovery.py) waits for it too."""
    times = [int(p["timestamp"]) for p in payloads if p.get("timestamp") is not None]
    if times:
        record_reissue(storage(), min(times))


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
        if outcome.collided:  # on its own it fails and is dead-lettered for an operator (docs/operations.md)
            log.critical("msg %s: its id is taken by another message; quarantined", outcome.msg_id)
            _quarantine(payload, "private.message")
    groups = [_persist_group(m) for m in batch if m.get("group_id") is not None]
    log.info("persisted %d message(s) from %d task(s): %d new, %d group", len(batch), len(items),
             sum(o.stored for o in outcomes), len(groups))
    return {item.id: ACK for item in items}


def _retry_later(item: BatchItem, exc: Exception) -> str:
    verdict = retry_later(persist_message, item, exc, "attempt", args=[_payloads(item)],
                          argsrepr="[message payload not shown]", **_route(item.routing_key))
    if verdict == ACK:
        try:
            _record_reissue(_payloads(item))
        except Exception:  # unrecorded: give the old task back too (the main process records that)
            return REQUEUE
    return verdict


def _persist_group(message: dict) -> dict:
    outcome = persist_group_message(storage(), message)
    for number, members in enumerate(outcome.chunks):
        dispatch_group_message.apply_async(
            args=[str(outcome.msg_id), message.get("origin_conn"), [str(uid) for uid in members]],
            argsrepr=f"[{outcome.msg_id}, chunk {number + 1}/{len(outcome.chunks)}, {len(members)} members]")
    log.info("msg %s persisted in group %s (new=%s, %d recipients in %d chunks)", outcome.msg_id,
             message["group_id"], outcome.stored, sum(map(len, outcome.chunks)), len(outcome.chunks))
    return {"msg_id": str(outcome.msg_id), "stored": outcome.stored, "chunks": len(outcome.chunks)}


def _redelivered(request) -> bool:
    # A second run (redelivery or retry) may find a push window it claimed but never queued.
    return bool((request.delivery_info or {}).get("redelivered")) or request.retries > 0


def _dispatch(request, batch: list[list]) -> list:
    outcomes = dispatch_private_messages(storage(), [(int(msg_id), origin) for msg_id, origin in batch])
    redelivered = _redelivered(request)
    for outcome in outcomes:
        metrics.message_dispatched(outcome)
        for user_id in outcome.offline_users:
            schedule_push(str(outcome.msg_id), user_id, PRIORITY_PRIVATE, redelivered)
    _await_confirmations([(uid, o.msg_id, o.conversation_id, PRIORITY_PRIVATE) for o in outcomes for uid in o.live_users])
    return outcomes


def _await_confirmations(items: list) -> None:
    """Live deliveries a device must confirm within LIVE_CONFIRM_SECONDS (app.chat.confirm)."""
    if items and await_confirmation(storage(), items, int(time.time() * 1000)):
        confirm_live_deliveries.apply_async(countdown=settings().live_confirm_seconds)


@app.task(name="tasks.pipeline.confirm_live_deliveries", bind=True, acks_late=True, **RETRY)
def confirm_live_deliveries(self) -> dict:
    """Live deliveries past their deadline with no device confirming: offline index and a push each."""
    s, now = storage(), int(time.time() * 1000)
    outcome = settle_due(s, now)
    for user_id, msg_id, priority in outcome.unconfirmed:
        schedule_push(str(msg_id), user_id, priority, _redelivered(self.request))
    if outcome.unconfirmed:
        log.info("%d live deliveries not confirmed within %ss: offline path (msgs %s …)", len(outcome.unconfirmed),
                 s.settings.live_confirm_seconds, outcome.unconfirmed[0][1])
    countdown = rearm_sweep(s, outcome, int(time.time() * 1000))
    if countdown is not None:
        confirm_live_deliveries.apply_async(countdown=countdown)
    return {"confirmed": outcome.confirmed, "unconfirmed": len(outcome.unconfirmed)}


@app.task(name="tasks.pipeline.dispatch_message", bind=True, acks_late=True, **RETRY)
def dispatch_message(self, msg_id: str, origin_conn: str | None = None) -> dict:
    """Live delivery, unread, offline index; a (coalesced) push for each offline recipient."""
    outcome = _dispatch(self.request, [[msg_id, origin_conn]])[0]
    log.info("msg %s dispatched: %d live connections, %d offline", msg_id, outcome.live_connections,
             len(outcome.offline_users))
    return {"msg_id": msg_id, "live": outcome.live_connections, "offline": [str(u) for u in outcome.offline_users]}


@app.task(name="tasks.pipeline.dispatch_messages", bind=True, acks_late=True, **RETRY)
def dispatch_messages(self, batch: list[list]) -> dict:
    """`dispatch_message` for a persist batch: [[msg_id, origin_conn], ...], in one go."""
    outcomes = _dispatch(self.request, batch)
    live, offline = sum(o.live_connections for o in outcomes), sum(len(o.offline_users) for o in outcomes)
    log.info("%d messages dispatched (%s …): %d live connections, %d offline", len(outcomes), batch[0][0],
             live, offline)
    return {"messages": len(outcomes), "live": live, "offline": offline}


@app.task(name="tasks.pipeline.dispatch_group_message", bind=True, acks_late=True, **RETRY)
def dispatch_group_message(self, msg_id: str, origin_conn: str | None, member_ids: list[str]) -> dict:
    """One chunk of a group message's members: streams, live delivery, unread, offline index, pushes."""
    outcome = fan_out_group_message(storage(), int(msg_id), [int(uid) for uid in member_ids], origin_conn)
    redelivered = _redelivered(self.request)
    for user_id in outcome.offline_users:
        schedule_push(msg_id, user_id, PRIORITY_GROUP, redelivered)
    _await_confirmations([(uid, int(msg_id), outcome.conversation_id, PRIORITY_GROUP) for uid in outcome.live_users])
    log.info("msg %s dispatched to %d group members: %d live connections, %d offline", msg_id,
             len(member_ids), outcome.live_connections, len(outcome.offline_users))
    return {"msg_id": msg_id, "live": outcome.live_connections, "offline": len(outcome.offline_users)}
