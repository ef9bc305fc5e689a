"""The web chat page at `/` (a static shell; everything else happens in app/static/chat.js).

The page holds no user data: the browser fetches it with the user's token and
renders it with textContent. A strict Content-Security-Policy (scripts and
styles from this origin only, no inline code) backs that up.
"""
from __future__ import annotations

from flask import Blueprint, make_response, render_template, request

bp = Blueprint("web", __name__)


@bp.get("/")
def chat_page():
    resp = make_response(render_template("chat.html"))
    secure = request.scheme == "https" or request.headers.get("X-Forwarded-Proto") == "https"
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {'wss' if secure else 'ws'}://{request.host}; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-cache"
    return resp
