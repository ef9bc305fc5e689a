"""REST API blueprints (the wire layer): parse bodies, call domain functions."""
from __future__ import annotations

from flask import current_app, request

from app.config import Settings
from app.errors import InvalidInput
from app.storage import Storage


def settings() -> Settings:
    return current_app.config["SETTINGS"]


def storage() -> Storage:
    return current_app.extensions["netherlink.storage"]


def json_body() -> dict:
    """The request's JSON object, or a 400 that says what is wrong."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object (Content-Type: application/json)")
    return body
