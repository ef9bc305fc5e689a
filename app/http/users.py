"""GET /api/users?username= and GET /api/users/{user_id}: look a user up by name or id (bearer token)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from app.http import storage
from app.http.chat import require_user
from app.accounts.users import find_user_by_username, user_by_id

bp = Blueprint("users", __name__, url_prefix="/api")


@bp.get("/users")
@require_user
def lookup_user():
    return jsonify(find_user_by_username(storage(), request.args.get("username")))


@bp.get("/users/<int:user_id>")
@require_user
def user_name(user_id: int):
    return jsonify(user_by_id(storage(), user_id))
