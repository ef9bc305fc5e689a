"""GET /metrics: the gateway's Prometheus metrics (text exposition format).

Served on the gateway's own port for Prometheus on the internal network;
deploy/nginx/nginx.conf keeps it off the public side.
"""
from __future__ import annotations

from flask import Blueprint, Response, request

from app import metrics

bp = Blueprint("metrics", __name__)
_registry = None


@bp.get("/metrics")
def gateway_metrics():
    global _registry
    if _registry is None:
        _registry = metrics.registry_for(metrics.is_gateway_metric)
    body, content_type = metrics.render(_registry, request.headers.get("Accept"))
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})
