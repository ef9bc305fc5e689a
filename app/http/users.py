"""GET /api/users?username= / ?prefix= and GET /api/users/{user_id}: look users up by name or id (bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from app.http import storage
from app.http.chat import require_user
from app.http.requests import UserLookup
from app.accounts.users import find_user_by_username, user_by_id, users_by_prefix

bp = Blueprint("users", __name__, url_prefix="/api")


@bp.get("/users")
@require_user
def lookup_user():
    lookup = UserLookup.parse(request.args)
    if lookup.prefix is not None:
        return jsonify(users=users_by_prefix(storage(), g.user_id, lookup.prefix))
    return jsonify(find_user_by_username(storage(), lookup.username))


@bp.get("/users/<int:user_id>")
@require_user
def user_name(user_id: int):
    return jsonify(user_by_id(storage(), user_id))
