"""Fixtures of the fast domain tests: the domain functions in this process, on real MySQL and Redis.

No gateway, no Celery worker: `chat` runs the send path as the wire layer
calls it (the gateway's MessageIntake with a `publish` that records what the
broker would have confirmed, then persist and dispatch as the message tasks
call them). The run has its own database and Redis db (the kind the suite
chose: real services, or the embedded defaults), emptied before every test;
`clock` is the time the domain functions that take a clock are given.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.harness import flush_redis_keeping_claim, provision_embedded, provision_real

UNIT_DIR = Path(__file__).resolve().parent
UNIT_SETTINGS = {"GROUP_FANOUT_CHUNK": "2"}


def pytest_itemcollected(item):
    # `pytest -m unit` selects this directory from anywhere in the suite.
    if UNIT_DIR in Path(item.path).parents:
        item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def unit_services(service_kind, tmp_path_factory):
    """A database and a Redis db for this directory alone (never the end-to-end run's)."""
    run_id = f"u{uuid.uuid4().hex[:9]}"
    if service_kind == "real":
        svc = provision_real(run_id, broker=False)
    else:
        svc = provision_embedded(run_id, tmp_path_factory.mktemp("unit-services"))
    try:
        from app.storage import upgrade_schema

        upgrade_schema(svc.database_url)
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="session")
def unit_storage(unit_services):
    from app.config import Settings
    from app.storage import Storage

    s = Storage(Settings.from_env(unit_services.env(**UNIT_SETTINGS)))
    yield s
    s.dispose()


@pytest.fixture
def storage(unit_storage):
    """app.storage.Storage on this directory's database and Redis db, both empty."""
    from models import Base

    with unit_storage.engine.begin() as conn:
        if unit_storage.is_mysql:
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
        if unit_storage.is_mysql:
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 1"))
    flush_redis_keeping_claim(unit_storage.redis)
    # A Redis that has remembered sends for longer than the dedupe window (the state of a running
    # system): no Redis loss to recover from, so an ack does not wait for storage here, where no
    # persist worker reports. The tests of a Redis loss flush it (tests/unit/test_intake.py).
    remembered_since = time.time() - unit_storage.settings.dedupe_ttl_seconds - 3600
    unit_storage.redis.set("dedupe:since", int(remembered_since * 1000))
    return unit_storage


class Clock:
    """A clock that moves only when a test moves it (seconds since the epoch, like time.time)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def ms(self) -> int:
        return int(self.now * 1000)


@pytest.fixture
def clock():
    return Clock(round(time.time(), 3))


@pytest.fixture
def make_user(storage):
    """make_user(username=None) -> user id, registered as the REST API registers."""
    from app.accounts.auth import register_user

    def _make(username: str | None = None) -> int:
        with storage.session() as session:
            return register_user(session, storage.settings, username or f"u{uuid.uuid4().hex[:12]}",
                                 "correct-horse")
    return _make


class Chat:
    """The send path in this process, with the broker replaced by a list of what it confirmed.

    `send` is what the gateway does with a `send` frame; `deliver` is what the
    persist and dispatch workers do with the queue (redelivery included: `redeliver`).
    """

    def __init__(self, storage, clock):
        from app.chat.intake import MessageIntake
        from app.ids import LeasedIds, NodeLease

        self.storage = storage
        self.published: list[dict] = []  # every payload the "broker" confirmed, in order
        self._queued: list[dict] = []
        self.ids = LeasedIds(NodeLease(storage.redis))
        self.intake = MessageIntake(storage, self.ids, self._publish, clock=clock)

    def _publish(self, payloads: list[dict], deadline: float | None = None, may_start=None) -> None:
        if may_start is not None and not may_start():  # as PersistPublisher: refused, nothing published
            from app.errors import Unavailable
            raise Unavailable("Redis lost its memory since the claim")
        # A copy through JSON, as a task message would carry it.
        copies = json.loads(json.dumps(payloads))
        self.published.extend(copies)
        self._queued.extend(copies)

    @staticmethod
    def request(client_msg_id: str | None, to: int | None, content: str, group_id: int | None = None):
        """A parsed `send` frame."""
        from app.chat.intake import SendRequest

        return SendRequest(client_msg_id or uuid.uuid4().hex, to, content, group_id=group_id)

    def send(self, sender: int, to: int | None = None, content: str = "hello", client_msg_id: str | None = None,
             group_id: int | None = None, conn: str = "conn-sender"):
        return self.intake.accept(sender, conn, self.request(client_msg_id, to, content, group_id))

    def deliver(self) -> dict:
        """Persist and dispatch everything queued; returns the outcomes by msg id."""
        queued, self._queued = self._queued, []
        return self.run_workers(queued)

    def redeliver(self, payloads: list[dict]) -> dict:
        """The broker hands these payloads over again (a worker died before its ack)."""
        return self.run_workers(json.loads(json.dumps(payloads)))

    def run_workers(self, payloads: list[dict]) -> dict:
        from app.chat.dispatch import dispatch_private_messages
        from app.chat.group_messages import fan_out_group_message, persist_group_message
        from app.chat.persist import persist_private_messages

        outcomes = {}
        private = [p for p in payloads if p.get("group_id") is None]
        persisted = persist_private_messages(self.storage, private)
        origins = {int(p["msg_id"]): p.get("origin_conn") for p in private}
        todo = [(o.msg_id, origins.get(o.msg_id)) for o in persisted if o.dispatch]
        dispatched = {d.msg_id: d for d in dispatch_private_messages(self.storage, todo)} if todo else {}
        for outcome in persisted:
            outcomes[outcome.msg_id] = (outcome, dispatched.get(outcome.msg_id))
        for payload in payloads:
            if payload.get("group_id") is None:
                continue
            outcome = persist_group_message(self.storage, payload)
            fanned = [fan_out_group_message(self.storage, outcome.msg_id, chunk, payload.get("origin_conn"))
                      for chunk in outcome.chunks]
            outcomes[outcome.msg_id] = (outcome, fanned)
        return outcomes

    def message(self, sender: int, to: int | None = None, content: str = "hello", group_id: int | None = None):
        """Send and deliver one message; returns its ack."""
        ack = self.send(sender, to, content, group_id=group_id)
        self.deliver()
        return ack


@pytest.fixture
def chat(storage, clock):
    c = Chat(storage, clock)
    yield c
    c.ids.lease.release()
