"""POST /api/auth/register, login, refresh, logout, logout-all and /api/ws-ticket."""
from __future__ import annotations

import logging

from flask import Blueprint, g, jsonify, request

from app.http import json_body, settings, storage
from app.accounts.auth import register_user
from app.accounts.lockout import authenticate_guarded
from app.accounts.sessions import (
    LOGOUT, LOGOUT_ALL, WS_TICKET_SECONDS, issue_ws_ticket, refresh_session, revoke_sessions, start_session,
)
from app.http.chat import require_user
from app.http.requests import Login, Refresh, Registration
from app.ratelimit import limit_login, limit_registration

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__, url_prefix="/api/auth")
tickets = Blueprint("ws_ticket", __name__, url_prefix="/api")


@bp.post("/register")
def register():
    body = json_body()
    limit_registration(storage(), request.remote_addr)  # before the checks: bad bodies count too
    req = Registration.parse(body)
    with storage().session() as session:
        user_id = register_user(session, settings(), req.username, req.password)
    log.info("user %s registered", user_id)
    return jsonify(user_id=str(user_id)), 201


def _tokens(tokens):
    return jsonify(access_token=tokens.access_token, refresh_token=tokens.refresh_token, token_type="Bearer",
                   user_id=str(tokens.user_id), expires_in=tokens.expires_in)


@bp.post("/login")
def login():
    body = json_body()
    limit_login(storage(), request.remote_addr, body.get("username"))
    req = Login.parse(body)
    user = authenticate_guarded(storage(), req.username, req.password)  # 429 while the name is locked
    tokens = start_session(storage(), user.id, request.headers.get("User-Agent"), request.remote_addr)
    return _tokens(tokens)


@bp.post("/refresh")
def refresh():
    req = Refresh.parse(json_body())
    return _tokens(refresh_session(storage(), req.refresh_token))


@bp.post("/logout")
@require_user
def logout():
    revoke_sessions(storage(), g.user_id, [g.claims.session_id], LOGOUT)
    return "", 204


@bp.post("/logout-all")
@require_user
def logout_all():
    revoke_sessions(storage(), g.user_id, None, LOGOUT_ALL)
    return "", 204


@tickets.post("/ws-ticket")
@require_user
def ws_ticket():
    ticket = issue_ws_ticket(storage(), g.user_id, g.claims.session_id, g.claims.expires_at)
    return jsonify(ticket=ticket, expires_in=WS_TICKET_SECONDS), 201
