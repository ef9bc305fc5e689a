"""Domain errors. Each maps to one WebSocket error code and one HTTP status."""
from __future__ import annotations


class ChatError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms  # set on rate_limited: when a retry can succeed


class InvalidInput(ChatError):
    code, http_status = "invalid_frame", 400


class Unauthorized(ChatError):
    code, http_status = "unauthorized", 401


class Forbidden(ChatError):
    code, http_status = "forbidden", 403


class NotFound(ChatError):
    code, http_status = "not_found", 404


class Conflict(ChatError):
    code, http_status = "conflict", 409


class TooLarge(ChatError):
    code, http_status = "too_large", 413


class UnsupportedMediaType(ChatError):
    code, http_status = "unsupported_media_type", 415


class RateLimited(ChatError):
    code, http_status = "rate_limited", 429


class Unavailable(ChatError):
    """A backing service is down; the client should retry (with the same client_msg_id)."""

    code, http_status = "internal", 503


class RecallExpired(ChatError):
    code, http_status = "recall_expired", 409


class EditExpired(ChatError):
    code, http_status = "edit_expired", 409
