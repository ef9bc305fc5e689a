"""Admin dashboard (server-rendered): failed pushes, filters, retry buttons.

Login is a form (admin accounts only) that sets a signed session cookie;
every form carries a CSRF token bound to that session.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from functools import wraps

from flask import Blueprint, abort, redirect, render_template, request, session, url_for

from app.http import storage
from app.accounts.audit import ACTOR_ADMIN, PUSH_RETRIED, PUSHES_RETRIED, list_audit, record
from app.http.admin import enqueue_deliveries, retry_detail
from app.accounts.lockout import authenticate_guarded
from app.ratelimit import limit_login
from app.errors import ChatError
from app.push.admin import PROVIDERS, STATUSES, PushFilter, is_admin, list_pushes, reopen_matching, reopen_push

bp = Blueprint("dashboard", __name__, url_prefix="/admin")


def init_dashboard(app) -> None:
    s = app.config["SETTINGS"]
    # Derived, not shared: the cookie key is not a JWT signing key.
    app.secret_key = hashlib.sha256(b"netherlink-admin-session:" + s.jwt_secret.encode()).hexdigest()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_SECURE=s.env == "production", SESSION_COOKIE_NAME="netherlink_admin")
    app.add_template_filter(lambda seconds: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)), "audit_time")
    app.register_blueprint(bp)


def _csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def admin_page(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        user_id = session.get("admin_user_id")
        if user_id is None:
            return redirect(url_for("dashboard.login", next=request.full_path))
        if not is_admin(storage(), user_id):
            session.clear()
            return render_template("admin/message.html", title="Forbidden",
                                   message="This account is not an admin."), 403
        if request.method == "POST" and request.form.get("csrf") != session.get("csrf"):
            abort(400, "the form expired: reload the page and try again")
        return view(*args, **kwargs)
    return wrapper


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        try:
            limit_login(storage(), request.remote_addr, request.form.get("username", ""))
            user = authenticate_guarded(storage(), request.form.get("username", ""), request.form.get("password", ""))
            if not user.is_admin:
                return render_template("admin/message.html", title="Forbidden",
                                       message="This account is not an admin."), 403
            session.clear()
            session["admin_user_id"], session["admin_name"] = user.id, user.username
            target = request.args.get("next", "")
            return redirect(target if target.startswith("/admin/") else url_for("dashboard.pushes"))
        except ChatError as err:
            error, status = err.message, err.http_status
    return render_template("admin/login.html", error=error), (status if error else 200)


@bp.post("/logout")
@admin_page
def logout():
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.get("/")
@bp.get("/pushes")
@admin_page
def pushes():
    args = request.args
    try:
        flt = PushFilter.parse(args.get("status", "failed"), args.get("user_id"), args.get("provider"))
        page = int(args.get("page", "1")) if args.get("page", "1").isdigit() else 1
        listing = list_pushes(storage(), flt, max(page, 1), 50)
        error = None
    except ChatError as err:
        flt, listing, error = PushFilter(), {"pushes": [], "page": 1, "per_page": 50, "total": 0}, err.message
    return render_template("admin/pushes.html", listing=listing, flt=flt, statuses=STATUSES, providers=PROVIDERS,
                           csrf=_csrf_token(), admin=session.get("admin_name"), error=error,
                           notice=request.args.get("notice"))


@bp.post("/pushes/<int:push_id>/retry")
@admin_page
def retry_one(push_id: int):
    try:
        enqueue_deliveries([(push_id, reopen_push(storage(), push_id))])
        record(storage(), session["admin_user_id"], ACTOR_ADMIN, PUSH_RETRIED, "push", push_id)
        notice = f"Push {push_id} queued for another attempt."
    except ChatError as err:
        notice = err.message
    return redirect(url_for("dashboard.pushes", notice=notice, **_filters(request.form)))


@bp.post("/pushes/retry")
@admin_page
def retry_matching():
    try:
        flt = PushFilter.parse(request.form.get("status") or "failed", request.form.get("user_id"),
                               request.form.get("provider"))
        reopened = reopen_matching(storage(), flt)
        enqueue_deliveries(reopened)
        record(storage(), session["admin_user_id"], ACTOR_ADMIN, PUSHES_RETRIED, "push", "filter",
               retry_detail(flt, reopened))
        notice = f"{len(reopened)} push(es) queued for another attempt."
    except ChatError as err:
        notice = err.message
    return redirect(url_for("dashboard.pushes", notice=notice, **_filters(request.form)))


def _filters(form) -> dict:
    return {k: form.get(k) for k in ("status", "user_id", "provider") if form.get(k)}


@bp.get("/audit")
@admin_page
def audit():
    """The audit log, newest first, 50 a page."""
    raw = request.args.get("page", "1")
    page = min(int(raw), 10**9) if raw.isascii() and raw.isdigit() and int(raw) > 0 else 1
    listing = list_audit(storage(), page, 50)
    return render_template("admin/audit.html", listing=listing, csrf=_csrf_token(), admin=session.get("admin_name"))
