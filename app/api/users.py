"""GET /api/users?username=: look a user up by name (bearer token)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from app.api import storage
from app.api.chat import require_user
from app.users import find_user_by_username

bp = Blueprint("users", __name__, url_prefix="/api")


@bp.get("/users")
@require_user
def lookup_user():
    return jsonify(find_user_by_username(storage(), request.args.get("username")))
