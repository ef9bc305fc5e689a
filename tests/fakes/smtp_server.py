"""A real local SMTP server (aiosmtpd) that keeps the mails it accepts.

`python -m tests.fakes.smtp_server --port 8025` runs it by hand and prints each mail.
"""
from __future__ import annotations

import argparse
import email
import threading
import time
from email.policy import default as default_policy

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from scripts.processes import free_port


class _Handler:
    def __init__(self, fake: "FakeSmtp"):
        self.fake = fake

    async def handle_RCPT(self, server, session, envelope: Envelope, address, rcpt_options):
        if address in self.fake.refused:
            return "550 5.1.1 no such mailbox"
        if self.fake.busy:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope: Envelope):
        mail = email.message_from_bytes(envelope.content, policy=default_policy)
        with self.fake.lock:
            self.fake.mails.append(mail)
        if self.fake.echo:
            print(f"--- mail to {mail['To']}: {mail['Subject']}\n{mail.get_content()}", flush=True)
        return "250 Message accepted"


class FakeSmtp:
    def __init__(self, port: int | None = None, echo: bool = False):
        self.port = port or free_port()
        self.mails: list = []
        self.refused: set[str] = set()
        self.busy = False  # answer 451 to every recipient
        self.echo = echo
        self.lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)

    def start(self) -> "FakeSmtp":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def mails_to(self, address: str) -> list:
        with self.lock:
            return [m for m in self.mails if m["To"] == address]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args()
    with FakeSmtp(args.port, echo=True):
        print(f"fake SMTP on 127.0.0.1:{args.port}: SMTP_HOST=127.0.0.1 SMTP_PORT={args.port}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
