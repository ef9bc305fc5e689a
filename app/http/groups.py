"""Groups and their members (REST, bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from app.http import json_body, storage
from app.http.chat import require_user
from app.errors import InvalidInput
from app.chat.groups import add_members, create_group, members_of, my_groups, remove_member, rename_group, set_role
from ws.frames import parse_id

bp = Blueprint("groups", __name__, url_prefix="/api")

MAX_IDS_PER_REQUEST = 1000


def _user_ids(body: dict, name: str) -> list[int]:
    raw = body.get(name, [])
    if not isinstance(raw, list):
        raise InvalidInput(f"'{name}' must be a list of user id strings")
    if len(raw) > MAX_IDS_PER_REQUEST:
        raise InvalidInput(f"'{name}' holds at most {MAX_IDS_PER_REQUEST} ids per request")
    return [parse_id(value, name) for value in raw]


@bp.post("/groups")
@require_user
def new_group():
    body = json_body()
    created = create_group(storage(), g.user_id, body.get("name"), _user_ids(body, "members"))
    return jsonify(group_id=str(created.group_id), conversation_id=created.conversation_id,
                   members=[str(uid) for uid in created.members]), 201


@bp.get("/groups")
@require_user
def list_groups():
    return jsonify(groups=my_groups(storage(), g.user_id))


@bp.patch("/groups/<group_id>")
@require_user
def change_group(group_id: str):
    rename_group(storage(), g.user_id, parse_id(group_id, "group_id"), json_body().get("name"))
    return "", 204


@bp.get("/groups/<group_id>/members")
@require_user
def list_members(group_id: str):
    return jsonify(members=members_of(storage(), g.user_id, parse_id(group_id, "group_id")))


@bp.post("/groups/<group_id>/members")
@require_user
def add_group_members(group_id: str):
    body = json_body()
    ids = _user_ids(body, "user_ids")
    if not ids:
        raise InvalidInput("'user_ids' must name at least one user")
    added = add_members(storage(), g.user_id, parse_id(group_id, "group_id"), ids)
    return jsonify(added=[str(uid) for uid in added])


@bp.delete("/groups/<group_id>/members/<user_id>")
@require_user
def remove_group_member(group_id: str, user_id: str):
    remove_member(storage(), g.user_id, parse_id(group_id, "group_id"), parse_id(user_id, "user_id"))
    return "", 204


@bp.patch("/groups/<group_id>/members/<user_id>")
@require_user
def change_member_role(group_id: str, user_id: str):
    set_role(storage(), g.user_id, parse_id(group_id, "group_id"), parse_id(user_id, "user_id"),
             json_body().get("role"))
    return "", 204
