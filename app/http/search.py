"""GET /api/search/messages: full-text search over the messages the user may see (bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from app.chat.search import search_messages
from app.http import storage
from app.http.chat import require_user
from app.http.requests import SearchPage
from app.wire import message_frame

bp = Blueprint("search", __name__, url_prefix="/api")


@bp.get("/search/messages")
@require_user
def search():
    page = SearchPage.parse(request.args)
    return jsonify(search_messages(storage(), g.user_id, page.q, page.conversation_id, page.before, page.limit,
                                   message_frame))
