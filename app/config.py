"""Typed settings read once from the environment.

Every key has a documented default (docs/configuration.md). Production refuses
to start on insecure defaults so a forgotten variable cannot ship a guessable
JWT secret or an open Flower.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"
ENVIRONMENTS = ("dev", "test", "production")


class ConfigError(RuntimeError):
    """The environment asks for something we refuse to run with."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {raw!r}")


@dataclass(frozen=True)
class Settings:
    env: str = "dev"
    # URLs may carry passwords: like the secrets, never in a repr (logs, tracebacks).
    database_url: str = field(default="sqlite:///var/netherlink.db", repr=False)
    database_replica_url: str = field(default="", repr=False)
    broker_url: str = field(default="amqp://guest:guest@127.0.0.1:5672//", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Redis through Sentinel (DESIGN §9): "host:port,host:port,…"; when set, the primary
    # is Sentinel's answer and REDIS_URL gives only the db and the password.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "netherlink"
    # "classic" (a single RabbitMQ node) or "quorum" (a cluster: the chat and push
    # queues replicated over its nodes; celeryconfig.py, docs/operations.md).
    rabbitmq_queue_type: str = "classic"
    jwt_secret: str = field(default=DEV_JWT_SECRET, repr=False)
    # Access tokens live JWT_TTL_SECONDS; a login's session (app.accounts.sessions) lives on through
    # rotating refresh tokens of REFRESH_TTL_SECONDS each. A token's session is looked up in MySQL at
    # most once per SESSION_CACHE_SECONDS per session (Redis cache; a revocation overwrites it at once).
    jwt_ttl_seconds: int = 900
    refresh_ttl_seconds: int = 30 * 86400
    session_cache_seconds: int = 10
    gateway_id: str = "gw1"
    gateway_port: int = 8000
    ws_max_frame_bytes: int = 65536
    # permessage-deflate, when a client offers it (browsers do): a compressor
    # and a decompressor per connection, about 100 KiB more per idle connection
    # (docs/benchmarks.md). Off: the offer is ignored and frames go uncompressed.
    ws_permessage_deflate: bool = True
    message_max_content_bytes: int = 16384
    # How long after sending its sender may edit a message (`edit`; `edit_expired` after).
    message_edit_window_seconds: int = 900
    heartbeat_interval_seconds: int = 30
    presence_ttl_seconds: int = 300
    dedupe_ttl_seconds: int = 86400
    publish_timeout_seconds: float = 5.0
    # Redis connections per process; more callers wait for a free one.
    redis_max_connections: int = 100
    # simple-websocket's protocol Ping to each socket (docs/protocol.md §5); 0 = none
    # (the app's own heartbeat still closes silent sockets; about 40 % less CPU on
    # idle connections, docs/benchmarks.md).
    ws_ping_interval_seconds: int = 25
    # Group commit at the gateway (app/group_commit.py, used by app/chat/intake.py): sends arriving while earlier
    # publishes await their confirms leave together, at most this many per task,
    # with this many batches awaiting confirms at once.
    publish_batch_max: int = 200
    publish_in_flight: int = 1
    # Batching in the persist worker (tasks/batching.py): it stores up to this
    # many queued persist_message tasks in one run; a run starts as soon as a
    # pool process is free, or (wait > 0) that many ms after its first message.
    persist_batch_max: int = 200
    persist_batch_wait_ms: int = 0
    # Batching in the push worker: it attempts up to this many queued deliver_push
    # tasks in one run (one transaction, the APNs requests at once), waiting at most
    # this long after the first one for more, and holds up to this many batches
    # unacknowledged (buffered or in its processes) at once.
    push_batch_max: int = 100
    push_batch_wait_ms: int = 10
    push_batches_in_flight: int = 2
    password_hash_profile: str = "default"
    apns_base_url: str = "https://api.push.apple.com"
    apns_key_file: str = ""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_topic: str = ""
    apns_ca_file: str = ""
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_credentials_file: str = ""
    # Web Push (RFC 8030/8291/8292): the VAPID signing key (EC P-256 PEM) and the contact the push
    # services see in every JWT (mailto: or https:); WEBPUSH_CA_FILE adds a CA to trust (the local fake's).
    vapid_private_key_file: str = ""
    vapid_subject: str = ""
    webpush_ca_file: str = ""
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_from: str = "NetherLink <noreply@localhost>"
    smtp_starttls: bool = False
    push_max_retries: int = 5
    push_retry_base_seconds: float = 2.0
    push_coalesce_seconds: float = 2.0
    # Badge sync / withdrawal after a read or recall: at most one silent push per user per this window.
    push_badge_coalesce_seconds: float = 3.0
    # A live message a device does not confirm (`received`, `read`) within this many seconds is treated
    # as undelivered: offline index and a push, as for an offline user (a socket that died silently). 0: off.
    live_confirm_seconds: float = 10.0
    email_digest_delay_seconds: float = 300.0
    offline_index_retention_days: int = 7
    push_log_retention_days: int = 30
    group_max_members: int = 2000
    # A deleted account's username stays reserved (no one can register it) for this many days.
    username_reuse_days: int = 30
    # Rate limits (0 switches one off). Sends per user, across all their connections.
    send_rate_per_second: float = 10.0
    send_burst: int = 50
    # Frames of any kind per connection (in-process); a connection that keeps
    # flooding after being told is closed with 1008.
    frame_rate_per_second: float = 30.0
    frame_burst: int = 120
    flood_close_after: int = 100
    # WebSocket connection attempts per client IP, and open connections per user.
    connect_rate_per_minute: float = 120.0
    connect_burst: int = 60
    max_connections_per_user: int = 10
    # Login attempts per client IP and per username.
    login_rate_per_minute: float = 10.0
    login_burst: int = 10
    # Registrations per client IP.
    register_rate_per_minute: float = 5.0
    register_burst: int = 10
    # Per-username lockout (app.accounts.lockout): after LOGIN_LOCKOUT_THRESHOLD failed logins in a
    # row, each further failure locks the name for BASE, 2×BASE, 4×BASE … seconds, at most MAX; the
    # count is forgotten RESET seconds after the last failure (0 threshold: off).
    login_lockout_threshold: int = 5
    login_lockout_base_seconds: float = 1.0
    login_lockout_max_seconds: float = 900.0
    login_lockout_reset_seconds: int = 3600
    # A frame carrying the client's clock `ts` (ms) is refused when it is further than
    # this from server time (0: not checked). (FRAME_SIGNING was removed: docs/security.md.)
    frame_max_clock_skew_seconds: int = 300
    # How often a gateway re-checks that its connected accounts still exist and are enabled.
    account_check_seconds: int = 30
    # Proxies in front of the app whose X-Forwarded-For is trusted (nginx: 1).
    trusted_proxy_count: int = 0
    group_fanout_chunk: int = 500
    # Media uploads (app/media, docs/configuration.md): where the files live, the largest upload,
    # each user's total, uploads per user per minute (0: off), the largest image in pixels
    # (a decompression bomb is refused), the thumbnail's longest side, the internal nginx
    # location that serves files after the app checked access ("" = the app sends the bytes),
    # and how long an upload no message names is kept.
    media_root: str = "var/media"
    media_max_bytes: int = 25 * 1024 * 1024
    media_quota_bytes: int = 1024 * 1024 * 1024
    media_upload_rate_per_minute: float = 30.0
    media_upload_burst: int = 10
    media_max_image_pixels: int = 40_000_000
    media_thumbnail_px: int = 320
    media_accel_redirect_prefix: str = ""
    media_unreferenced_hours: float = 24.0
    flower_basic_auth: str = field(default="", repr=False)
    log_level: str = "INFO"
    # Metrics (docs/operations.md, "Metrics and alerts"). Gateways always serve /metrics on their port.
    worker_metrics_port: int = 0  # a Celery worker serves /metrics here from its main process; 0: off
    worker_metrics_address: str = "0.0.0.0"
    # Read by prometheus_client itself (multiprocess mode); one directory per worker, required with a port.
    prometheus_multiproc_dir: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from upper-case environment variables of the same names."""
        environ = os.environ if environ is None else environ
        if _bool_or_true(environ.get("FRAME_SIGNING", "")):
            # Removed: its key travelled in hello over the very socket it protected (nothing over TLS).
            raise ConfigError("FRAME_SIGNING was removed (it added nothing over TLS: docs/security.md, "
                              "\"Frame signing\"); unset it to start")
        values = {}
        for f in fields(cls):
            key = "NETHERLINK_ENV" if f.name == "env" else f.name.upper()
            if f.name in overrides:
                values[f.name] = overrides[f.name]
                continue
            raw = environ.get(key)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.jwt_ttl_seconds < 30 or self.refresh_ttl_seconds < self.jwt_ttl_seconds:
            raise ConfigError("JWT_TTL_SECONDS must be at least 30 and REFRESH_TTL_SECONDS at least JWT_TTL_SECONDS")
        if not 0 <= self.session_cache_seconds <= 60:
            raise ConfigError("SESSION_CACHE_SECONDS must be from 0 (no cache) to 60")
        if self.login_lockout_threshold < 0 or not 0 < self.login_lockout_base_seconds <= \
                self.login_lockout_max_seconds or self.login_lockout_reset_seconds < 1:
            raise ConfigError("LOGIN_LOCKOUT_THRESHOLD must be 0 (off) or more, 0 < LOGIN_LOCKOUT_BASE_SECONDS <= "
                              "LOGIN_LOCKOUT_MAX_SECONDS and LOGIN_LOCKOUT_RESET_SECONDS at least 1")
        if self.env not in ENVIRONMENTS:
            raise ConfigError(f"NETHERLINK_ENV must be one of {', '.join(ENVIRONMENTS)}, got {self.env!r}")
        if not 0 <= self.live_confirm_seconds <= 3600:
            raise ConfigError("LIVE_CONFIRM_SECONDS must be from 0 (off) to 3600")
        if not 2 <= self.group_max_members <= 100_000:
            raise ConfigError("GROUP_MAX_MEMBERS must be from 2 to 100000")
        if not 0 <= self.username_reuse_days <= 3650:
            raise ConfigError("USERNAME_REUSE_DAYS must be from 0 to 3650")
        if not 0 <= self.message_edit_window_seconds <= 10 * 365 * 86400:
            raise ConfigError("MESSAGE_EDIT_WINDOW_SECONDS must be from 0 (no edits) to 315360000 (ten years)")
        if not 1 <= self.group_fanout_chunk <= 5000:
            raise ConfigError("GROUP_FANOUT_CHUNK must be from 1 to 5000")
        for rate, burst in (("send_rate_per_second", "send_burst"), ("frame_rate_per_second", "frame_burst"),
                            ("connect_rate_per_minute", "connect_burst"), ("login_rate_per_minute", "login_burst"),
                            ("register_rate_per_minute", "register_burst")):
            if getattr(self, rate) < 0 or (getattr(self, rate) > 0 and getattr(self, burst) < 1):
                raise ConfigError(f"{rate.upper()} must be 0 (off) or positive, with {burst.upper()} at least 1")
        if self.flood_close_after < 1 or self.max_connections_per_user < 0:
            raise ConfigError("FLOOD_CLOSE_AFTER must be at least 1 and MAX_CONNECTIONS_PER_USER 0 (off) or more")
        if not 1 <= self.publish_batch_max <= 1000 or not 1 <= self.publish_in_flight <= 16:
            raise ConfigError("PUBLISH_BATCH_MAX must be from 1 to 1000 and PUBLISH_IN_FLIGHT from 1 to 16")
        if not 1 <= self.persist_batch_max <= 2000 or not 0 <= self.persist_batch_wait_ms <= 1000:
            raise ConfigError("PERSIST_BATCH_MAX must be from 1 to 2000 and PERSIST_BATCH_WAIT_MS from 0 to 1000")
        if not 1 <= self.redis_max_connections <= 10_000 or self.ws_ping_interval_seconds < 0:
            raise ConfigError("REDIS_MAX_CONNECTIONS must be from 1 to 10000 and WS_PING_INTERVAL_SECONDS 0 or more")
        if not 1 <= self.push_batch_max <= 1000 or not 1 <= self.push_batch_wait_ms <= 1000:
            raise ConfigError("PUSH_BATCH_MAX must be from 1 to 1000 and PUSH_BATCH_WAIT_MS from 1 to 1000")
        if not 1 <= self.push_batches_in_flight <= 64:
            raise ConfigError("PUSH_BATCHES_IN_FLIGHT must be from 1 to 64")
        if self.media_max_bytes < 1 or self.media_quota_bytes < self.media_max_bytes:
            raise ConfigError("MEDIA_MAX_BYTES must be at least 1 and MEDIA_QUOTA_BYTES at least MEDIA_MAX_BYTES")
        if not 16 <= self.media_thumbnail_px <= 2048 or self.media_max_image_pixels < 1:
            raise ConfigError("MEDIA_THUMBNAIL_PX must be from 16 to 2048 and MEDIA_MAX_IMAGE_PIXELS at least 1")
        if self.media_upload_rate_per_minute < 0 or (self.media_upload_rate_per_minute > 0
                                                     and self.media_upload_burst < 1):
            raise ConfigError("MEDIA_UPLOAD_RATE_PER_MINUTE must be 0 (off) or positive, "
                              "with MEDIA_UPLOAD_BURST at least 1")
        if self.media_accel_redirect_prefix and not self.media_accel_redirect_prefix.startswith("/"):
            raise ConfigError("MEDIA_ACCEL_REDIRECT_PREFIX must be empty or an internal location such as /_media/")
        if not 0.1 <= self.push_badge_coalesce_seconds <= 300:
            raise ConfigError("PUSH_BADGE_COALESCE_SECONDS must be from 0.1 to 300")
        if self.vapid_subject and not self.vapid_subject.startswith(("mailto:", "https://")):
            raise ConfigError("VAPID_SUBJECT must be a mailto: or https: URI (RFC 8292 section 2.1)")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ConfigError(f"WORKER_METRICS_PORT must be 0 (off) or a TCP port, got {self.worker_metrics_port}")
        if self.rabbitmq_queue_type not in ("classic", "quorum"):
            raise ConfigError(f"RABBITMQ_QUEUE_TYPE must be classic or quorum, got {self.rabbitmq_queue_type!r}")
        if self.rabbitmq_queue_type == "quorum" and not self.broker_is_amqp:
            raise ConfigError("RABBITMQ_QUEUE_TYPE=quorum needs BROKER_URL to point at RabbitMQ (amqp://)")
        if self.redis_sentinels and not (self.sentinel_addresses and self.redis_sentinel_master):
            raise ConfigError("REDIS_SENTINELS must list host:port pairs, with REDIS_SENTINEL_MASTER naming the master")
        if self.env != "production":
            return
        problems = []
        if self.jwt_secret == DEV_JWT_SECRET or len(self.jwt_secret) < 32:
            problems.append("JWT_SECRET must be set to a random value of at least 32 characters")
        if self.database_url.startswith("sqlite"):
            problems.append("DATABASE_URL must point at MySQL, not the embedded SQLite file")
        if not self.flower_basic_auth or ":" not in self.flower_basic_auth:
            problems.append("FLOWER_BASIC_AUTH must be set as user:password")
        if self.password_hash_profile != "default":
            problems.append("PASSWORD_HASH_PROFILE must be 'default' (the fast profile is for tests)")
        problems.extend(_vapid_problems(self))
        if problems:
            raise ConfigError("refusing to start in production: " + "; ".join(problems))

    @property
    def broker_is_amqp(self) -> bool:
        return self.broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty when Redis is reached directly."""
        addresses = []
        for entry in filter(None, (e.strip() for e in self.redis_sentinels.split(","))):
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"REDIS_SENTINELS must be host:port,host:port,…; got {entry!r}")
            addresses.append((host, int(port)))
        return addresses


def _vapid_problems(settings: Settings) -> list[str]:
    """Production: a VAPID key that others can read, or a placeholder contact, is refused.

    Web Push is optional (no key file: webpush devices are not pushed), as APNs is; but a key
    that is set must be private, since whoever holds it can push to every subscribed browser.
    """
    if not settings.vapid_private_key_file:
        return []
    problems = []
    try:
        mode = os.stat(settings.vapid_private_key_file).st_mode
    except OSError as exc:
        return [f"VAPID_PRIVATE_KEY_FILE {settings.vapid_private_key_file!r} cannot be read: {exc.strerror}"]
    if mode & 0o077:
        problems.append("VAPID_PRIVATE_KEY_FILE must not be readable by group or others (chmod 600)")
    if not settings.vapid_subject or "example." in settings.vapid_subject or "localhost" in settings.vapid_subject:
        problems.append("VAPID_SUBJECT must name a real contact (mailto:ops@your-domain or https://your-domain)")
    return problems


def _bool_or_true(raw: str) -> bool:
    """A set boolean variable (anything not read as false counts as set: refuse rather than guess)."""
    try:
        return _bool(raw)
    except ValueError:
        return True


def _parse(type_name, raw: str):
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    if type_name == "int":
        return int(raw)
    if type_name == "float":
        return float(raw)
    if type_name == "bool":
        return _bool(raw)
    return raw
