"""Admin REST API for pushes (admin role only)."""
from __future__ import annotations

from functools import wraps

from flask import Blueprint, g, jsonify, request

from app.http import json_body, storage
from app.http.chat import require_user
from app.http.requests import PushListPage, PushRetrySelection
from app.errors import Forbidden, Unavailable
from app.push.admin import fail_reopened, is_admin, list_pushes, reopen_matching, reopen_push

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
    return jsonify(id=str(push_id), status="pending"), 202


@bp.post("/pushes/retry")
@require_admin
def retry_many():
    selection = PushRetrySelection.parse(json_body())  # explicit: {} means "every failed push", no body is an error
    reopened = reopen_matching(storage(), selection.filter)
    enqueue_deliveries(reopened)
    return jsonify(retried=len(reopened), ids=[str(i) for i, _ in reopened]), 202
