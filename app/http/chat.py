"""Conversations, history, unread and presence (REST, bearer token)."""
from __future__ import annotations

from functools import wraps

from flask import Blueprint, g, jsonify, request

from app.http import settings, storage
from app.accounts.status import require_active
from app.accounts.auth import verify_token
from app.accounts.sessions import require_session
from app.accounts.privacy import PRESENCE_HIDDEN_MESSAGE, may_see_presence
from app.chat.conversations import history, list_conversations
from app.chat.presence import Presence
from app.chat.receipts import message_receipts
from app.chat.unread import unread_counts
from app.errors import Forbidden, Unauthorized
from app.http.requests import HistoryPage
from app.wire import message_frame, parse_id

bp = Blueprint("chat", __name__, url_prefix="/api")


def require_user(view):
    """Bearer-token authentication for a REST view; sets g.user_id."""
    @wraps(view)
    def wrapper(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise Unauthorized("missing bearer token (Authorization: Bearer <JWT>)")
        g.claims = verify_token(settings(), header[len("Bearer "):].strip())
        g.user_id = g.claims.user_id
        require_session(storage(), g.user_id, g.claims.session_id)  # logged out: refused at once
        with storage().sessions() as session:  # a deleted or disabled account's tokens stop working at once
            require_active(session, g.user_id)
        return view(*args, **kwargs)
    return wrapper


@bp.get("/conversations")
@require_user
def conversations():
    return jsonify(conversations=list_conversations(storage(), g.user_id))


@bp.get("/conversations/<conversation_id>/messages")
@require_user
def conversation_messages(conversation_id: str):
    page = HistoryPage.parse(request.args)
    return jsonify(history(storage(), g.user_id, conversation_id, page.before, page.limit, message_frame))


@bp.get("/conversations/<conversation_id>/messages/<msg_id>/receipts")
@require_user
def message_receipts_view(conversation_id: str, msg_id: str):
    return jsonify(message_receipts(storage(), g.user_id, conversation_id, parse_id(msg_id, "msg_id")))


@bp.get("/unread")
@require_user
def unread():
    counts = unread_counts(storage(), g.user_id)
    return jsonify(conversations=counts, total=sum(counts.values()))


@bp.get("/users/<int:user_id>/presence")
@require_user
def presence(user_id: int):
    if not may_see_presence(storage(), g.user_id, user_id):  # NotFound for an unknown or deleted user
        raise Forbidden(PRESENCE_HIDDEN_MESSAGE)  # their privacy setting, or a block: the same answer
    state = Presence(storage().redis, settings().presence_ttl_seconds).presence_of(user_id)
    return jsonify(user_id=str(user_id), **state)
