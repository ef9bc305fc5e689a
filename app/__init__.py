"""NetherLink: the Flask application factory (REST API, health, WebSocket gateway, web chat page)."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from app.config import Settings
from app.errors import ChatError, InvalidInput
from app.storage import Storage

log = logging.getLogger(__name__)


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app from the environment; `test_config` overrides settings by name."""
    settings = Settings.from_env(**(test_config or {}))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["JSON_SORT_KEYS"] = False
    # simple-websocket closes a connection whose frame exceeds this (close code 1009).
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.ws_max_frame_bytes,
                                         "ping_interval": settings.ws_ping_interval_seconds or None}
    app.extensions["netherlink.storage"] = Storage(settings)
    from app.media.store import store_for

    app.extensions["netherlink.media_store"] = store_for(settings)
    if settings.trusted_proxy_count:  # client addresses (rate limits, logs) from X-Forwarded-For
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_count,
                                x_proto=settings.trusted_proxy_count)

    from app.http.account import bp as account_bp
    from app.http.auth import bp as auth_bp, tickets as ws_ticket_bp
    from app.http.chat import bp as chat_bp
    from app.http.groups import bp as groups_bp
    from app.http.admin import bp as admin_api_bp
    from app.http.push import bp as push_bp
    from app.http.users import bp as users_bp
    from app.http.search import bp as search_bp
    from app.http.media import bp as media_bp
    from app.http.dashboard import init_dashboard
    from app.http.health import bp as health_bp
    from app.http.metrics import bp as metrics_bp
    from app.http.cli import register_commands
    from app.http.web import bp as web_bp
    from ws import init_gateway

    app.register_blueprint(auth_bp)
    app.register_blueprint(ws_ticket_bp)
    app.register_blueprint(chat_bp)
    app.register_blueprint(groups_bp)
    app.register_blueprint(push_bp)
    app.register_blueprint(users_bp)
    app.register_blueprint(search_bp)
    app.register_blueprint(media_bp)
    app.register_blueprint(admin_api_bp)
    app.register_blueprint(account_bp)
    init_dashboard(app)
    app.register_blueprint(health_bp)
    app.register_blueprint(web_bp)
    app.register_blueprint(metrics_bp)
    init_gateway(app)
    register_commands(app)
    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ChatError)
    def _chat_error(err: ChatError):
        # REST bodies are requests, not frames: same error, REST's name for it.
        code = "invalid_request" if isinstance(err, InvalidInput) else err.code
        if err.retry_after_ms is None:
            return jsonify(error=code, message=err.message), err.http_status
        response = jsonify(error=code, message=err.message, retry_after_ms=err.retry_after_ms)
        response.headers["Retry-After"] = str(max(1, -(-err.retry_after_ms // 1000)))  # whole seconds, rounded up
        return response, err.http_status

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        code = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "too_large", 429: "rate_limited"}.get(err.code, "error")
        response = jsonify(error=code, message=err.description)
        for name, value in err.get_headers():  # e.g. a 405's Allow; the body is ours, not werkzeug's HTML
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, err.code

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return jsonify(error="internal", message="internal error; it has been logged"), 500
