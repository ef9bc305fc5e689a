"""The web chat page at `/` (a static shell; everything else happens in app/static/chat.js).

The page holds no user data: the browser fetches it with the user's token and
renders it with textContent. A strict Content-Security-Policy (scripts and
styles from this origin only, no inline code) backs that up. `connect-src
'self'` covers the page's own ws:// or wss:// origin (CSP Level 3), also
behind a proxy on another port.
"""
from __future__ import annotations

from flask import Blueprint, current_app, make_response, render_template, send_from_directory

from app.http import settings

bp = Blueprint("web", __name__)

# img-src blob:: pictures are fetched with the bearer token and shown from object URLs
# (a token cannot go into an <img src>).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@bp.get("/")
def chat_page():
    # The page offers Edit for as long as the server accepts it (docs/protocol.md §22).
    resp = make_response(render_template("chat.html",
                                         edit_window_seconds=settings().message_edit_window_seconds))
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/sw.js")
def service_worker():
    """The chat page's service worker (Web Push), from the site's root so that its scope is the whole
    site; not cached, so a new version reaches browsers at their next visit."""
    resp = send_from_directory(current_app.static_folder, "sw.js", mimetype="text/javascript", max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp
