"""Devices and push settings (REST, bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify
from sqlalchemy import select

from app.http import json_body, storage
from app.http.chat import require_user
from app.push.settings import (
    device_view, load_preferences, register_device, remove_device, update_preferences,
)
from models import Device

bp = Blueprint("push", __name__, url_prefix="/api")


@bp.post("/devices")
@require_user
def add_device():
    body = json_body()
    with storage().session() as session:
        device = register_device(session, g.user_id, body.get("platform"), body.get("token"))
        view = device_view(device)
    return jsonify(view), 201


@bp.get("/devices")
@require_user
def my_devices():
    with storage().sessions() as session:
        devices = session.scalars(select(Device).where(Device.user_id == g.user_id).order_by(Device.id)).all()
    return jsonify(devices=[device_view(d) for d in devices])


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
        return jsonify(load_preferences(session, g.user_id).view())


@bp.put("/push-settings")
@require_user
def put_push_settings():
    body = json_body()
    with storage().session() as session:
        prefs = update_preferences(session, g.user_id, body)
    return jsonify(prefs.view())
