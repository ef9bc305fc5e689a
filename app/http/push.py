"""Devices and push settings (REST, bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from app.http import json_body, storage
from app.errors import NotFound
from app.http.chat import require_user
from app.push.providers.vapid import vapid_public_key_of
from app.http.requests import DeviceRegistration, EmailVerification, PushSettingsUpdate
from app.push.email_verification import confirm_email, issue_code, limit_verification_mails, needs_verification, send_code
from app.push.settings import (
    device_view, list_devices, load_preferences, register_device, remove_device, save_preferences,
)

bp = Blueprint("push", __name__, url_prefix="/api")


@bp.post("/devices")
@require_user
def add_device():
    registration = DeviceRegistration.parse(json_body())
    with storage().session() as session:
        device = register_device(session, g.user_id, registration.platform, registration.token,
                                 registration.subscription)
        view = device_view(device)
    return jsonify(view), 201


@bp.get("/push/vapid-public-key")
def vapid_public_key():
    """The application server key a browser subscribes with (PushManager.subscribe's
    applicationServerKey): no login needed, it is public."""
    key = vapid_public_key_of(storage().settings)
    if key is None:
        raise NotFound("web push is not configured on this server")
    return jsonify(public_key=key)


@bp.get("/devices")
@require_user
def my_devices():
    with storage().sessions() as session:
        return jsonify(devices=[device_view(d) for d in list_devices(session, g.user_id)])


@bp.delete("/devices/<path:token>")
@require_user
def delete_device(token: str):
    with storage().session() as session:
        remove_device(session, g.user_id, token)
    return "", 204


@bp.get("/push-settings")
@require_user
def get_push_settings():
    with storage().sessions() as session:
        return jsonify(load_preferences(session, [g.user_id])[g.user_id].view())


@bp.put("/push-settings")
@require_user
def put_push_settings():
    update = PushSettingsUpdate.parse(json_body())
    code = None
    with storage().session() as session:
        prefs = update.applied_to(load_preferences(session, [g.user_id])[g.user_id])
        verify = "email" in update.given and needs_verification(session, g.user_id, prefs.email)
        if verify:
            limit_verification_mails(storage(), g.user_id)  # 429 before anything changes
        save_preferences(session, g.user_id, prefs)
        if verify:
            code = issue_code(session, g.user_id, prefs.email)
    if code is not None:  # after the commit: the code that was mailed is the stored one
        send_code(storage(), g.user_id, prefs.email, code)
    with storage().sessions() as session:
        return jsonify(load_preferences(session, [g.user_id])[g.user_id].view())


@bp.post("/push-settings/email/verify")
@require_user
def verify_email():
    req = EmailVerification.parse(json_body())
    confirm_email(storage(), g.user_id, req.code)
    with storage().sessions() as session:
        return jsonify(load_preferences(session, [g.user_id])[g.user_id].view())
