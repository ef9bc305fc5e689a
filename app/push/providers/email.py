"""Email over SMTP: the channel for digests (a digest is a `PushRequest` of its own kind: the
address in `token`, the subject in `title`, the text in `body`)."""
from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from app.config import Settings
from app.push.providers import Delivered, PermanentFailure, PushOutcome, PushRequest, TemporaryFailure

log = logging.getLogger(__name__)


class EmailClient:
    def __init__(self, settings: Settings):
        self.settings = settings

    def send_many(self, requests: list[PushRequest]) -> list[PushOutcome]:
        """The digest mails, one after the other (a digest is rare; a connection each keeps it simple)."""
        return [self._send(request) for request in requests]

    def _send(self, request: PushRequest) -> PushOutcome:
        """One mail; the only place that talks SMTP."""
        s = self.settings
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = s.smtp_from, request.token, request.title
        mail["Message-ID"] = make_msgid(domain="netherlink")
        mail.set_content(request.body)
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=15) as smtp:
                if s.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password)
                refused = smtp.send_message(mail)
        except smtplib.SMTPRecipientsRefused as exc:
            return _refused(exc.recipients)
        except smtplib.SMTPResponseException as exc:
            reason = f"SMTP {exc.smtp_code}"
            return TemporaryFailure(reason) if 400 <= exc.smtp_code < 500 else PermanentFailure(reason)
        except (OSError, smtplib.SMTPException) as exc:  # connection refused, timeout, dropped
            return TemporaryFailure(f"SMTP unavailable: {exc.__class__.__name__}")
        if refused:
            return _refused(refused)
        return Delivered(mail["Message-ID"])


def _refused(recipients: dict) -> PushOutcome:
    """4xx from the server means later; 5xx means never."""
    code = next(iter(recipients.values()))[0] if recipients else 550
    reason = f"recipient refused: SMTP {code}"
    return TemporaryFailure(reason) if 400 <= code < 500 else PermanentFailure(reason)
