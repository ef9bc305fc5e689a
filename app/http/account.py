"""The account's own safety controls (bearer token): blocks, presence privacy, export, deletion,
password change."""
from __future__ import annotations

import logging

from flask import Blueprint, Response, g, jsonify, stream_with_context

from app.accounts.blocks import block_user, list_blocks, unblock_user
from app.accounts.deletion import delete_account, export_account
from app.accounts.privacy import privacy_of, set_privacy
from app.accounts.sessions import change_password
from app.http import json_body, storage
from app.http.chat import require_user
from app.http.requests import AccountDeletion, PasswordChange, PrivacyUpdate
from app.ratelimit import Limit, take
from app.wire import parse_id

log = logging.getLogger(__name__)
bp = Blueprint("account", __name__, url_prefix="/api")


@bp.get("/blocks")
@require_user
def blocks():
    return jsonify(blocks=list_blocks(storage(), g.user_id))


@bp.put("/blocks/<user_id>")
@require_user
def block(user_id: str):
    block_user(storage(), g.user_id, parse_id(user_id, "user_id"))
    return "", 204


@bp.delete("/blocks/<user_id>")
@require_user
def unblock(user_id: str):
    unblock_user(storage(), g.user_id, parse_id(user_id, "user_id"))
    return "", 204


@bp.get("/privacy")
@require_user
def privacy():
    return jsonify(privacy_of(storage(), g.user_id))


@bp.put("/privacy")
@require_user
def change_privacy():
    req = PrivacyUpdate.parse(json_body())
    return jsonify(set_privacy(storage(), g.user_id, req.presence))


@bp.get("/account/export")
@require_user
def export():
    log.info("user %s exports their data", g.user_id)
    body = stream_with_context(export_account(storage(), g.user_id))
    return Response(body, mimetype="application/json",
                    headers={"Content-Disposition": 'attachment; filename="netherlink-export.json"',
                             "Cache-Control": "no-store"})


@bp.delete("/account")
@require_user
def delete():
    req = AccountDeletion.parse(json_body())
    _limit_password_guesses("delete", "account deletion attempts")
    delete_account(storage(), g.user_id, req.password)
    return "", 204


@bp.put("/account/password")
@require_user
def password():
    req = PasswordChange.parse(json_body())
    _limit_password_guesses("password", "password change attempts")
    change_password(storage(), g.user_id, g.claims.session_id, req.old_password, req.new_password)
    return "", 204


def _limit_password_guesses(kind: str, what: str) -> None:
    """A request that checks the password is a password guess: limited like a login."""
    limits = storage().settings
    take(storage(), "login-user", f"{kind}:{g.user_id}",
         Limit.per_minute(limits.login_rate_per_minute, limits.login_burst), what)
