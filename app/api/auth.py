"""POST /api/auth/register and /api/auth/login."""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

from app.api import json_body, settings, storage
from app.auth import authenticate, issue_token, register_user
from app.ratelimit import Limit, take

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__, url_prefix="/api/auth")


@bp.post("/register")
def register():
    body = json_body()
    with storage().session() as session:
        user_id = register_user(session, settings(), body.get("username"), body.get("password"))
    log.info("user %s registered", user_id)
    return jsonify(user_id=str(user_id)), 201


@bp.post("/login")
def login():
    body = json_body()
    limit = Limit.per_minute(settings().login_rate_per_minute, settings().login_burst)
    take(storage(), "login-ip", request.remote_addr or "unknown", limit, "login attempts from this address")
    username = body.get("username")
    if isinstance(username, str):  # per account too: a distributed guess at one password is slowed as well
        take(storage(), "login-user", username.strip().lower()[:64], limit, "login attempts for this account")
    with storage().sessions() as session:
        user = authenticate(session, settings(), body.get("username"), body.get("password"))
    token = issue_token(settings(), user.id)
    return jsonify(access_token=token, token_type="Bearer", user_id=str(user.id),
                   expires_in=settings().jwt_ttl_seconds)
