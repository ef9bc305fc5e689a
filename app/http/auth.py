"""POST /api/auth/register and /api/auth/login."""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

from app.http import json_body, settings, storage
from app.accounts.auth import authenticate, issue_token, register_user
from app.http.requests import Login, Registration
from app.ratelimit import limit_login, limit_registration

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__, url_prefix="/api/auth")


@bp.post("/register")
def register():
    body = json_body()
    limit_registration(storage(), request.remote_addr)  # before the checks: bad bodies count too
    req = Registration.parse(body)
    with storage().session() as session:
        user_id = register_user(session, settings(), req.username, req.password)
    log.info("user %s registered", user_id)
    return jsonify(user_id=str(user_id)), 201


@bp.post("/login")
def login():
    body = json_body()
    limit_login(storage(), request.remote_addr, body.get("username"))
    req = Login.parse(body)
    with storage().sessions() as session:
        user = authenticate(session, settings(), req.username, req.password)
    token = issue_token(settings(), user.id)
    return jsonify(access_token=token, token_type="Bearer", user_id=str(user.id),
                   expires_in=settings().jwt_ttl_seconds)
