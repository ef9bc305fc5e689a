"""Groups and their members (REST, bearer token)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from app.http import json_body, storage
from app.http.chat import require_user
from app.http.requests import GroupCreation, GroupRename, MemberAddition, RoleChange
from app.chat.groups import add_members, create_group, delete_group, members_of, my_groups, remove_member, rename_group, set_role
from app.wire import parse_id

bp = Blueprint("groups", __name__, url_prefix="/api")


@bp.post("/groups")
@require_user
def new_group():
    req = GroupCreation.parse(json_body())
    created = create_group(storage(), g.user_id, req.name, req.members)
    return jsonify(group_id=str(created.group_id), conversation_id=created.conversation_id,
                   members=[str(uid) for uid in created.members]), 201


@bp.get("/groups")
@require_user
def list_groups():
    return jsonify(groups=my_groups(storage(), g.user_id))


@bp.patch("/groups/<group_id>")
@require_user
def change_group(group_id: str):
    group = parse_id(group_id, "group_id")
    rename_group(storage(), g.user_id, group, GroupRename.parse(json_body()).name)
    return "", 204


@bp.delete("/groups/<group_id>")
@require_user
def remove_group(group_id: str):
    delete_group(storage(), g.user_id, parse_id(group_id, "group_id"))
    return "", 204


@bp.get("/groups/<group_id>/members")
@require_user
def list_members(group_id: str):
    return jsonify(members=members_of(storage(), g.user_id, parse_id(group_id, "group_id")))


@bp.post("/groups/<group_id>/members")
@require_user
def add_group_members(group_id: str):
    req = MemberAddition.parse(json_body())
    added = add_members(storage(), g.user_id, parse_id(group_id, "group_id"), req.user_ids)
    return jsonify(added=[str(uid) for uid in added])


@bp.delete("/groups/<group_id>/members/<user_id>")
@require_user
def remove_group_member(group_id: str, user_id: str):
    remove_member(storage(), g.user_id, parse_id(group_id, "group_id"), parse_id(user_id, "user_id"))
    return "", 204


@bp.patch("/groups/<group_id>/members/<user_id>")
@require_user
def change_member_role(group_id: str, user_id: str):
    group, member = parse_id(group_id, "group_id"), parse_id(user_id, "user_id")
    set_role(storage(), g.user_id, group, member, RoleChange.parse(json_body()).role)
    return "", 204
