"""The WebSocket gateway: Flask-Sock route /ws bound in the app factory."""
from __future__ import annotations

from flask import Flask, current_app, g, request
from flask_sock import Sock
from redis.exceptions import RedisError

from app.accounts.auth import verify_token
from app.accounts.sessions import redeem_ws_ticket, require_session
from app.accounts.status import require_active
from app.errors import RateLimited
from app.chat.presence import Presence
from app.ratelimit import Limit, take, warn_unenforced

sock = Sock()


class _ReaderGreenlet:
    """simple-websocket's per-socket reader as a bare greenlet: under gevent a
    threading.Thread is a greenlet plus a wrapper with its own locks and events,
    kept for the socket's whole life (memory per idle connection)."""

    name = "simple_websocket.Base._thread"

    def __init__(self, target):
        self._target = target

    def start(self) -> None:
        import gevent

        gevent.spawn(self._target)


def init_gateway(app: Flask) -> None:
    from ws.gateway import Gateway

    app.extensions["netherlink.gateway"] = Gateway(app.config["SETTINGS"], app.extensions["netherlink.storage"])
    try:
        from gevent import monkey
        from gevent.event import Event

        if monkey.is_module_patched("threading"):  # the gunicorn gevent worker
            app.config["SOCK_SERVER_OPTIONS"].update(thread_class=_ReaderGreenlet, event_class=Event)
    except ImportError:
        pass
    sock.init_app(app)

    @app.before_request
    def _authenticate_upgrade():
        # Refuse before the upgrade: an unauthenticated socket never opens.
        if request.path != "/ws":
            return None
        settings, storage = app.config["SETTINGS"], app.extensions["netherlink.storage"]
        if not settings.ws_permessage_deflate:
            # simple-websocket accepts permessage-deflate whenever it is offered; unoffered, it is not used.
            request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        # Counted before the token check: guessing tokens costs attempts too.
        take(storage, "connect", request.remote_addr or "unknown",
             Limit.per_minute(settings.connect_rate_per_minute, settings.connect_burst), "connection attempts")
        ticket = request.args.get("ticket")
        if ticket is not None:  # one use (app.accounts.sessions): browsers keep tokens out of URLs
            claims = redeem_ws_ticket(storage, ticket)
        else:
            token = request.args.get("token")  # deprecated in URLs (logged by proxies): docs/protocol.md §3
            header = request.headers.get("Authorization", "")
            if not token and header.startswith("Bearer "):
                token = header[len("Bearer "):].strip()
            claims = verify_token(app.config["SETTINGS"], token)
            require_session(storage, claims.user_id, claims.session_id)
        with storage.sessions() as session:
            require_active(session, claims.user_id)
        limit = settings.max_connections_per_user
        try:
            open_now = len(Presence(storage.redis, settings.presence_ttl_seconds)
                           .live_connections([claims.user_id])[claims.user_id]) if limit else 0
        except RedisError as exc:  # like every limit: not enforced while Redis is away
            warn_unenforced("connections-per-user", exc)
            open_now = 0
        if open_now >= limit > 0:
            raise RateLimited(f"too many open connections for this account (at most {limit}); close one first",
                              retry_after_ms=5000)
        g.ws_claims = claims
        return None


@sock.route("/ws")
def gateway_socket(ws):
    claims = g.ws_claims
    current_app.extensions["netherlink.gateway"].serve(ws, claims.user_id, claims.expires_at, request.remote_addr,
                                                       session_id=claims.session_id)
