"""Admin REST API (admin role only): pushes, message removal, the audit log."""
from __future__ import annotations

from functools import wraps

import logging

from flask import Blueprint, g, jsonify, request

from app.accounts.audit import (ACTOR_ADMIN, MESSAGE_REMOVED, PUSH_RETRIED, PUSHES_RETRIED, list_audit, record,
                                record_in)
from app.chat.delivery import deliver_to_users
from app.chat.recall import recall_message
from app.http import json_body, storage
from app.http.chat import require_user
from app.http.requests import AuditPage, PushListPage, PushRetrySelection
from app.errors import Forbidden, Unavailable
from app.wire import parse_id, recalled_frame
from app.push.admin import fail_reopened, is_admin, list_pushes, reopen_matching, reopen_push

log = logging.getLogger(__name__)
bp = Blueprint("admin_api", __name__, url_prefix="/api/admin")


def require_admin(view):
    @require_user
    @wraps(view)
    def wrapper(*args, **kwargs):
        if not is_admin(storage(), g.user_id):
            raise Forbidden("admins only")
        return view(*args, **kwargs)
    return wrapper


def enqueue_deliveries(pushes: list[tuple[int, int]]) -> None:
    from tasks.publish import queue_push_delivery

    for i, (push_id, priority) in enumerate(pushes):
        try:
            queue_push_delivery(push_id, priority, attempt=0)  # reopened: attempts start again at 0
        except Exception:
            for unqueued, _ in pushes[i:]:  # none may stay pending with nothing queued for it
                fail_reopened(storage(), unqueued, "retry could not be queued (broker unavailable); try again")
            raise Unavailable("the broker is unavailable: the retry was not queued") from None


@bp.get("/pushes")
@require_admin
def pushes():
    req = PushListPage.parse(request.args)
    return jsonify(list_pushes(storage(), req.filter, req.page, req.per_page))


@bp.post("/pushes/<int:push_id>/retry")
@require_admin
def retry_one(push_id: int):
    priority = reopen_push(storage(), push_id)
    enqueue_deliveries([(push_id, priority)])
    record(storage(), g.user_id, ACTOR_ADMIN, PUSH_RETRIED, "push", push_id)
    return jsonify(id=str(push_id), status="pending"), 202


@bp.post("/pushes/retry")
@require_admin
def retry_many():
    selection = PushRetrySelection.parse(json_body())  # explicit: {} means "every failed push", no body is an error
    reopened = reopen_matching(storage(), selection.filter)
    enqueue_deliveries(reopened)
    record(storage(), g.user_id, ACTOR_ADMIN, PUSHES_RETRIED, "push", "filter", retry_detail(selection.filter, reopened))
    return jsonify(retried=len(reopened), ids=[str(i) for i, _ in reopened]), 202


def retry_detail(flt, reopened) -> dict:
    """What a bulk retry's audit entry keeps: the filter and how many (ids of the first 100)."""
    return {"status": flt.status, "user_id": str(flt.user_id) if flt.user_id else None, "provider": flt.provider,
            "count": len(reopened), "ids": [str(i) for i, _ in reopened[:100]]}


@bp.delete("/messages/<msg_id>")
@require_admin
def remove_message(msg_id: str):
    """Remove a message's content for everyone, as a recall by "admin" (live and in every stream)."""
    outcome = recall_message(storage(), g.user_id, parse_id(msg_id, "msg_id"), as_admin=True)
    with storage().session() as session:
        record_in(session, g.user_id, ACTOR_ADMIN, MESSAGE_REMOVED, "message", outcome.msg_id,
                  {"conversation_id": outcome.conversation_id, "sender_id": str(outcome.sender_id)})
    recalled = recalled_frame(outcome.msg_id, outcome.conversation_id, by=outcome.by)
    try:
        deliver_to_users(storage(), recalled, outcome.parties)
    except Exception as exc:  # stored and in every stream: offline and online devices learn it by sync
        log.warning("msg %s removed, live recalled frames not sent: %s", outcome.msg_id, type(exc).__name__)
    _sync_badges(outcome.parties, outcome.msg_id)
    log.info("admin %s removed msg %s", g.user_id, outcome.msg_id)
    return "", 204


def _sync_badges(user_ids: list[int], msg_id: int) -> None:
    from tasks.publish import queue_badge_syncs

    try:
        queue_badge_syncs(storage(), user_ids, msg_id)
    except Exception as exc:  # a stale badge at worst
        log.warning("badge sync after msg %s removal not queued: %s", msg_id, type(exc).__name__)


@bp.get("/audit")
@require_admin
def audit():
    req = AuditPage.parse(request.args)
    return jsonify(list_audit(storage(), req.page, req.per_page, req.action))
