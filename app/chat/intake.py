"""The gateway side of a send: validate, dedupe, snowflake id, durable publish, ack.

The gateway hands every parsed `send` frame to `MessageIntake.accept`; the
intake claims the send's dedupe record, makes its id, publishes it through the
`publish` callable it was given (tasks/publish.py: broker-confirmed) and
returns the ack. No Flask, Celery or gateway imports here.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select

from app.chat.conversations import private_conversation_id
from app.chat.groups import group_conversation_id, require_sender
from app.errors import ChatError, InvalidInput, NotFound, Unavailable
from app.group_commit import GroupCommit
from app.ids import LeasedIds
from app.storage import Storage
from models import Message, User

log = logging.getLogger(__name__)

DEDUPE_KEY = "dedupe:{}:{}"  # sender, client_msg_id -> "p:<msg_id>:<ms>" until published, then the ack JSON
DEDUPE_SINCE_KEY = "dedupe:since"  # when this Redis started remembering sends
RECOVERY_ACK_WAIT_SECONDS = 10.0
# One round trip per send: the send's dedupe record, made pending with a new id
# unless it exists ("" then), and since when this Redis remembers sends (set now
# if it did not know). KEYS: record, since. ARGV: pending value, TTL, now (ms).
_CLAIM_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  value = ''
end
local since = redis.call('GET', KEYS[2])
if not since then
  redis.call('SET', KEYS[2], ARGV[3])
  since = ARGV[3]
end
return {value, since}
"""
_FORGET_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class SendRequest:
    """A validated `send` frame: exactly one of `to` (private) or `group_id`."""

    client_msg_id: str
    to: int | None
    content: str
    group_id: int | None = None
    message_type: str = "text"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ack:
    client_msg_id: str
    msg_id: int
    conversation_id: str
    timestamp: int

    def to_json(self) -> str:
        return json.dumps({"m": str(self.msg_id), "c": self.conversation_id, "t": self.timestamp})

    @classmethod
    def from_json(cls, client_msg_id: str, raw: str) -> "Ack":
        data = json.loads(raw)
        return cls(client_msg_id, int(data["m"]), data["c"], int(data["t"]))


class MessageIntake:
    """Gateway side of a send: validate, dedupe, id, durable publish, ack.

    `publish(payloads)` must return only once the broker confirmed every one of
    them and raise Unavailable otherwise (tasks.publish.PersistPublisher.publish_all).
    Concurrent sends share round trips (app.group_commit): their dedupe claims go
    to Redis as one pipeline, their payloads to the broker as one publish, and
    their dedupe records become final acks in one pipeline after the confirm.

    Dedupe lives in Redis (fast path). Redis may forget (flush, restart), so
    for DEDUPE_TTL after it last did, a miss is checked against MySQL's
    UNIQUE(sender_id, client_msg_id); and for DEDUPE_RECOVERY after it, when a
    first copy may still be queued, the ack waits until the message is stored
    and carries the id that was stored, whichever copy won.
    """

    def __init__(self, storage: Storage, ids: LeasedIds, publish: Callable[[list[dict]], None],
                 clock: Callable[[], float] = time.time):
        self.storage = storage
        self.redis = storage.redis
        self.ids = ids
        self.clock = clock
        settings = storage.settings
        self.dedupe_ttl = settings.dedupe_ttl_seconds
        self.recovery_seconds = settings.dedupe_recovery_seconds
        self._publish_many = publish
        timeout = settings.publish_timeout_seconds
        self._claim = GroupCommit("the dedupe store", self.claim_many, 10, 500)
        self._publish = GroupCommit("the message broker", self._publish_and_record, timeout * 4 + 5,
                                    settings.publish_batch_max, settings.publish_in_flight)
        self._known_users: set[int] = set()

    def accept(self, sender_id: int, origin_conn: str, req: SendRequest) -> Ack:
        if req.group_id is not None:
            conversation_id = group_conversation_id(req.group_id)
        else:
            if req.to == sender_id:
                raise InvalidInput("'to' is yourself: messages to oneself are not supported")
            self._require_user(req.to)
            conversation_id = private_conversation_id(sender_id, req.to)
        key = DEDUPE_KEY.format(sender_id, req.client_msg_id)
        try:
            # The id is kept for the whole dedupe window, published or not: every
            # retry publishes this same id, and persist collapses copies by id.
            now = self.clock()
            fresh = f"p:{self._next_id()}:{int(now * 1000)}"
            value, since = self._claim((key, fresh, int(now * 1000)))
            fresh_record = value == ""
            value = fresh if fresh_record else value
            memory_age = max(0.0, now - int(since) / 1000)
            if fresh_record and memory_age < self.dedupe_ttl:
                # Redis lost its memory within the dedupe window: MySQL's
                # UNIQUE(sender_id, client_msg_id) answers for stored sends.
                stored = self._lookup_stored(sender_id, req.client_msg_id)
                if stored is not None:
                    self.redis.set(key, stored.to_json(), ex=self.dedupe_ttl)
                    return stored
            ack = self._ack_of(req.client_msg_id, conversation_id, value)
            if not value.startswith("p:"):
                return ack  # published and acked before
            if req.group_id is not None:  # never acked: only a member may send it, checked in MySQL
                try:
                    require_sender(self.storage, sender_id, req.group_id)
                except ChatError:
                    if fresh_record:  # no record of a send that was refused
                        self.storage.script(_FORGET_SCRIPT)(keys=[key], args=[fresh])
                    raise
        except ChatError:
            raise
        except Exception as exc:  # Redis down: refuse rather than risk a second copy
            log.warning("send refused, Redis unavailable: %s", exc.__class__.__name__)
            raise Unavailable("message not accepted (dedupe store unavailable); retry with the same client_msg_id") from None
        self._publish({
            "msg_id": str(ack.msg_id), "conversation_id": conversation_id, "sender_id": sender_id,
            "to": req.to, "group_id": req.group_id, "client_msg_id": req.client_msg_id,
            "message_type": req.message_type, "content": req.content, "extra": req.extra,
            "timestamp": ack.timestamp, "origin_conn": origin_conn,
        })
        if memory_age < self.recovery_seconds:
            ack = self._stored_ack(sender_id, req)
            self.redis.set(key, ack.to_json(), ex=self.dedupe_ttl)
        return ack

    def claim_many(self, items: list[tuple[str, str, int]]) -> list:
        """Dedupe claims (record key, pending value, now in ms) in one round trip: for each,
        [the record's value before, or "" if this claim made it; ms since Redis remembers]."""
        script, pipe = self.storage.script(_CLAIM_SCRIPT), self.redis.pipeline(transaction=False)
        for key, pending, now_ms in items:
            script(keys=[key, DEDUPE_SINCE_KEY], args=[pending, self.dedupe_ttl, now_ms], client=pipe)
        return pipe.execute()

    def _publish_and_record(self, payloads: list[dict]) -> list:
        self._publish_many(payloads)
        self._record_acks(payloads)
        return [None] * len(payloads)

    def _record_acks(self, payloads: list[dict]) -> None:
        """After the broker confirmed these messages: their dedupe records become final
        acks, in one round trip. Losing this is harmless: a pending record still gives
        a retry the same id, and persist keeps one copy per id."""
        pipe = self.redis.pipeline(transaction=False)
        for p in payloads:
            ack = Ack(p["client_msg_id"], int(p["msg_id"]), p["conversation_id"], int(p["timestamp"]))
            pipe.set(DEDUPE_KEY.format(p["sender_id"], p["client_msg_id"]), ack.to_json(), ex=self.dedupe_ttl)
        try:
            pipe.execute()
        except Exception as exc:
            log.warning("dedupe records of %d acked messages not finalised (%s); retries republish the same ids",
                        len(payloads), exc.__class__.__name__)

    def _next_id(self) -> int:
        try:
            return self.ids.next_id()
        except Exception as exc:  # the node lease could not be renewed: no id is safe to make
            log.warning("send refused, snowflake lease not renewable: %s", exc.__class__.__name__)
            raise Unavailable("message not accepted (this gateway cannot renew its id lease); "
                              "retry with the same client_msg_id") from None

    @staticmethod
    def _ack_of(client_msg_id: str, conversation_id: str, value: str) -> Ack:
        """The ack a dedupe record stands for: final ("{json}") or pending ("p:<id>:<ms>")."""
        if not value.startswith("p:"):
            return Ack.from_json(client_msg_id, value)
        _, msg_id, timestamp = value.split(":")
        return Ack(client_msg_id, int(msg_id), conversation_id, int(timestamp))

    def _require_user(self, user_id: int) -> None:
        if user_id in self._known_users:
            return
        with self.storage.sessions() as session:
            if session.get(User, user_id) is None:
                raise NotFound(f"user {user_id} does not exist")
        if len(self._known_users) > 100_000:
            self._known_users.clear()
        self._known_users.add(user_id)

    def _lookup_stored(self, sender_id: int, client_msg_id: str) -> Ack | None:
        # Three columns through the unique index, no ORM object: for a day after Redis
        # lost its data this runs for every new send.
        with self.storage.engine.connect() as conn:
            row = conn.execute(select(Message.id, Message.conversation_id, Message.timestamp).where(
                Message.sender_id == sender_id, Message.client_msg_id == client_msg_id)).first()
        return Ack(client_msg_id, row.id, row.conversation_id, row.timestamp) if row is not None else None

    def _stored_ack(self, sender_id: int, req: SendRequest) -> Ack:
        """Wait until this send is stored; the ack names the copy that was kept."""
        deadline = self.clock() + RECOVERY_ACK_WAIT_SECONDS
        while self.clock() < deadline:
            ack = self._lookup_stored(sender_id, req.client_msg_id)
            if ack is not None:
                return ack
            time.sleep(0.02)
        raise Unavailable("message queued but not yet confirmed stored; retry with the same client_msg_id")

