"""Digest email addresses are mailed only once their owner proved they read them.

Saving an address (a new one, or the same one again while it is unconfirmed) stores the
SHA-256 of a fresh 6-digit code, valid for a day, and mails the code to the address through
the digest's SMTP settings; `confirm_email` with that code marks the address verified.
Changing the address drops the verification. A code survives at most MAX_ATTEMPTS wrong
guesses; the mails an account can cause are rate-limited (VERIFY_MAILS_PER_HOUR).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

from sqlalchemy.orm import Session

from app.errors import Conflict, Forbidden
from app.push.providers import Delivered, PushRequest
from app.push.providers.email import EmailClient
from app.ratelimit import Limit, take
from app.storage import Storage
from models import PushSetting

log = logging.getLogger(__name__)

CODE_TTL_MS = 24 * 3600 * 1000
MAX_ATTEMPTS = 5
VERIFY_MAILS_PER_HOUR, VERIFY_MAILS_BURST = 6, 3


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(user_id: int, email: str, code: str) -> str:
    return hashlib.sha256(f"{user_id}:{email}:{code}".encode()).hexdigest()


def limit_verification_mails(storage: Storage, user_id: int) -> None:
    """RateLimited (429) before anything is saved, when this account asked for too many mails."""
    take(storage, "email-verify", user_id, Limit.per_minute(VERIFY_MAILS_PER_HOUR / 60, VERIFY_MAILS_BURST),
         "verification emails")


def needs_verification(session: Session, user_id: int, email: str | None) -> bool:
    """Whether saving `email` sends a verification mail: an address that is not verified yet."""
    if email is None:
        return False
    row = session.get(PushSetting, user_id)
    return row is None or row.email != email or row.email_verified_at is None


def issue_code(session: Session, user_id: int, email: str) -> str:
    """A new code for the user's (just saved) address; any verification of it is dropped."""
    code = f"{secrets.randbelow(10**6):06d}"
    session.flush()
    row = session.get(PushSetting, user_id)
    row.email_verified_at, row.email_code_hash = None, _digest(user_id, email, code)
    row.email_code_expires_at, row.email_code_attempts = _now_ms() + CODE_TTL_MS, 0
    return code


def send_code(storage: Storage, user_id: int, email: str, code: str) -> bool:
    """Mail the code (SMTP_* settings, as digests); False if the mail server did not take it."""
    request = PushRequest(
        token=email, title="Confirm your email address for NetherLink",
        body=(f"Your NetherLink confirmation code is {code}.\n\nEnter it in the app (or POST it to "
              "/api/push-settings/email/verify) within 24 hours to receive email digests at this address.\n"
              "If you did not ask for this, ignore this mail: nothing will be sent to you."),
        badge=0, conversation_id="", msg_id="")
    outcome = EmailClient(storage.settings).send_many([request])[0]
    if isinstance(outcome, Delivered):
        log.info("user %s: verification mail sent", user_id)
        return True
    log.warning("user %s: verification mail not sent (%s)", user_id, type(outcome).__name__)
    return False


def confirm_email(storage: Storage, user_id: int, code: str) -> None:
    """Verify the pending address with its code: Conflict if none waits, Forbidden if wrong or expired."""
    with storage.session() as session:
        row = session.get(PushSetting, user_id, with_for_update=True)
        if row is None or row.email is None or row.email_code_hash is None:
            if row is not None and row.email is not None and row.email_verified_at is not None:
                return  # already verified: confirming again changes nothing
            raise Conflict("no email address is waiting for confirmation: save one in /api/push-settings first")
        if row.email_code_expires_at < _now_ms() or row.email_code_attempts >= MAX_ATTEMPTS:
            raise Forbidden("this code expired or was guessed wrong too often: save the address again for a new code")
        if not hmac.compare_digest(row.email_code_hash, _digest(user_id, row.email, code)):
            row.email_code_attempts += 1
            wrong = True
        else:
            row.email_verified_at, row.email_code_hash, row.email_code_expires_at = _now_ms(), None, None
            wrong = False
    if wrong:  # the attempt is counted (committed) before the answer
        raise Forbidden("wrong code")
    log.info("user %s: digest email address verified", user_id)
