"""Liveness (/healthz) and readiness (/readyz: database, Redis, broker)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from app.http import settings, storage

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok", gateway_id=settings().gateway_id)


@bp.get("/readyz")
def readyz():
    checks = {"database": _check_database, "redis": _check_redis, "broker": _check_broker}
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:  # report, never raise: this is what operators look at
            results[name] = f"unavailable: {exc.__class__.__name__}"
    gateway = current_app.extensions.get("netherlink.gateway")
    if gateway is not None and gateway.draining:
        results["gateway"] = "draining"
    ready = all(v == "ok" for v in results.values())
    return jsonify(status="ready" if ready else "not_ready", checks=results,
                   gateway_id=settings().gateway_id), (200 if ready else 503)


def _check_database():
    with storage().engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_redis():
    storage().redis.ping()


def _check_broker():
    from tasks import app as celery_app

    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
