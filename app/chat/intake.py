"""The gateway side of a send: validate, dedupe, snowflake id, durable publish, ack.

The gateway hands every parsed `send` frame to `MessageIntake.accept`; the
intake claims the send's dedupe record, makes its id, publishes it through the
`publish` callable it was given (tasks/publish.py: broker-confirmed) and
returns the ack. No Flask, Celery or gateway imports here.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select

from app.accounts.blocks import blocks_lookup, require_not_blocked
from app.chat.conversations import private_conversation_id
from app.chat.groups import group_conversation_id, require_sender
from app.chat.references import check_references
from app.chat.recovery import (DEDUPE_SINCE_KEY, OLD_RECORDS_KEY, RECOVERED_KEY, REBUILT_KEY, KNOWN_FOR_MS, RecoveryWatch, StoredAcks, grace_ms,
                               rebuild_sender)
from app.errors import ChatError, InvalidInput, NotFound, Unavailable
from app.group_commit import GroupCommit
from app.ids import LeasedIds
from app.storage import Storage
from models import Message, User

log = logging.getLogger(__name__)

DEDUPE_KEY = "dedupe:{}:{}"  # sender, client_msg_id -> "p:<msg_id>:<ms>" until published, then the ack JSON
RECOVERY_ACK_WAIT_SECONDS = 10.0
# One round trip per send: the send's dedupe record, made pending with a new id
# unless it exists ("" then), and since when this Redis remembers sends (set now
# if it did not know). Within the dedupe window after a loss whose risk window
# this gateway knows closed (ARGV[4]), a sender whose records were not rebuilt
# from MySQL yet gets "?" and no record: the gateway rebuilds them and claims
# again; a rebuilt sender's send that has no record takes its record from
# before the loss, if any. KEYS: record, since, the sender's rebuilt marker,
# recovered, the sender's old records. ARGV: pending value, TTL, now (ms), the
# `since` known drained or "", client_msg_id.
_CLAIM_SCRIPT = """
local value = redis.call('GET', KEYS[1])
local since = redis.call('GET', KEYS[2])
if not since then
  redis.call('SET', KEYS[2], ARGV[3])
  since = ARGV[3]
end
if not value then
  if tonumber(ARGV[3]) - tonumber(since) < tonumber(ARGV[2]) * 1000 then
    if ARGV[4] == since and redis.call('GET', KEYS[3]) ~= since and redis.call('GET', KEYS[4]) ~= since then
      return {'?', since}
    end
    local old = redis.call('HGET', KEYS[5], ARGV[5])
    if old then
      redis.call('SET', KEYS[1], old, 'EX', ARGV[2])
      return {old, since}
    end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  value = ''
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
    reply_to: int | None = None  # the msg_id this send answers (app.chat.references checks it)
    mentions: tuple[int, ...] = ()  # group sends: mentioned members, deduplicated


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

    `publish(payloads, deadline)` must return only once the broker confirmed every
    one of them, raise Unavailable otherwise, and start no attempt after `deadline`
    (tasks.publish.PersistPublisher.publish_all). Concurrent sends share round trips
    (app.group_commit): their dedupe claims go to Redis as one pipeline, their
    payloads to the broker as one publish, and their dedupe records become final
    acks in one pipeline after the confirm.

    Dedupe lives in Redis (fast path). Redis may forget (flush, restart, a new
    deployment): until the persist pipeline drained past the loss (app.chat.recovery,
    the risk window, seconds on a healthy pipeline) an ack waits until the message is
    stored and names the copy that was kept, whichever copy won; after it, a sender's
    records are rebuilt from MySQL's UNIQUE(sender_id, client_msg_id) once, before its
    first send claims a record, and sends run at full speed again.
    """

    def __init__(self, storage: Storage, ids: LeasedIds, publish: Callable[..., None],
                 clock: Callable[[], float] = time.time, probe: Callable[[str, int], None] | None = None):
        self.storage = storage
        self.redis = storage.redis
        self.ids = ids
        self.clock = clock
        settings = storage.settings
        self.dedupe_ttl = settings.dedupe_ttl_seconds
        self._publish_many = publish
        timeout = settings.publish_timeout_seconds
        # A claim older than this is not published any more (its sender gets an error and retries).
        self.publish_timeout = timeout
        self.grace = grace_ms()
        self.recovery = RecoveryWatch(storage, self.grace, probe, clock)
        self.stored_acks = StoredAcks(storage)
        self._claim = GroupCommit("the dedupe store", self.claim_many, 10, 500)
        self._publish = GroupCommit("the message broker", self._publish_and_record, timeout * 4 + 5,
                                    settings.publish_batch_max, settings.publish_in_flight)
        self._known_users: set[int] = set()
        self._rebuild_locks = [threading.Lock() for _ in range(64)]

    def accept(self, sender_id: int, origin_conn: str, req: SendRequest) -> Ack:
        return self._accept(sender_id, origin_conn, req, None)

    def _accept(self, sender_id: int, origin_conn: str, req: SendRequest, held: str | None) -> Ack:
        """`held`: the pending record this send made and held, unpublished, through a risk window."""
        if req.group_id is not None:
            conversation_id = group_conversation_id(req.group_id)
        else:
            if req.to == sender_id:
                raise InvalidInput("'to' is yourself: messages to oneself are not supported")
            self._require_user(req.to)
            conversation_id = private_conversation_id(sender_id, req.to)
        key = DEDUPE_KEY.format(sender_id, req.client_msg_id)
        in_window = fresh_record = False
        try:
            # The id is kept for the whole dedupe window, published or not: every
            # retry publishes this same id, and persist collapses copies by id.
            now = self.clock()
            fresh = f"p:{self._next_id()}:{int(now * 1000)}"
            # A private send's block lookup (does the recipient block the sender?) rides along.
            value, since, blocks = self._claim((key, sender_id, req.client_msg_id, fresh, int(now * 1000),
                                                self.recovery.drained_since(), req.to))
            if value == "?":  # the loss's risk window is over: this sender's records first
                self._rebuild(sender_id, int(since))
                value, since, blocks = self._claim((key, sender_id, req.client_msg_id, fresh, int(now * 1000), "",
                                                    req.to))
            since = int(since)
            # A record this send made (now, or before it held through the window): no copy of it
            # was published under that record.
            fresh_record = value == "" or (held is not None and value == held)
            value = fresh if value == "" else value
            recovering = now - since / 1000 < self.dedupe_ttl
            # In the risk window a first copy from before the loss may still be queued (see below);
            # after it, a pending record made since the loss may name a copy persist did not keep.
            in_window = value.startswith("p:") and recovering and self.recovery.open(since)
            wait_for_storage = value.startswith("p:") and recovering and (not fresh_record or in_window)
            ack = self._ack_of(req.client_msg_id, conversation_id, value)
            if not value.startswith("p:"):
                return ack  # published and acked before
            if req.group_id is not None:  # never acked: only a member may send it, checked in MySQL
                try:
                    require_sender(self.storage, sender_id, req.group_id)
                    check_references(self.storage, sender_id, conversation_id, req.group_id, req.reply_to,
                                     req.mentions)
                except ChatError:
                    # A retry of a send acked before the loss, by a sender who left since.
                    stored = self._lookup_stored(sender_id, req.client_msg_id) if wait_for_storage else None
                    if stored is not None:
                        self.redis.set(key, stored.to_json(), ex=self.dedupe_ttl)
                        return stored
                    if fresh_record:  # no record of a send that was refused
                        self.storage.script(_FORGET_SCRIPT)(keys=[key], args=[value])
                    raise
            else:  # never acked: a recipient who blocked the sender refuses it (every client_msg_id)
                try:
                    require_not_blocked(self.storage, req.to, sender_id, blocks)
                    check_references(self.storage, sender_id, conversation_id, None, req.reply_to, ())
                except ChatError:
                    if fresh_record:
                        self.storage.script(_FORGET_SCRIPT)(keys=[key], args=[value])
                    raise
            if in_window:
                # A first copy from before the loss may still be queued. Published now, this copy
                # could be stored first (persist processes run side by side), under another id
                # than the one that first copy's ack named. So nothing is published until a copy
                # is stored (its id is the ack) or the window closes (every copy from before the
                # loss is stored, and none is this send's).
                stored = self._await_window(sender_id, req.client_msg_id, since)
                if stored is not None:
                    self.redis.set(key, stored.to_json(), ex=self.dedupe_ttl)
                    return stored
                # Closed with no copy stored: claim again (the record is ours, or a newer loss
                # opened a new window) and publish with that claim's time.
                return self._accept(sender_id, origin_conn, req, value if fresh_record else None)
        except ChatError as err:
            if isinstance(err, Unavailable) and in_window and fresh_record:
                self.storage.script(_FORGET_SCRIPT)(keys=[key], args=[value])  # its retry waits the same way
            raise
        except Exception as exc:  # Redis down: refuse rather than risk a second copy
            log.warning("send refused, Redis unavailable: %s", exc.__class__.__name__)
            raise Unavailable("message not accepted (dedupe store unavailable); retry with the same client_msg_id") from None
        refused = self._publish(({
            "msg_id": str(ack.msg_id), "conversation_id": conversation_id, "sender_id": sender_id,
            "to": req.to, "group_id": req.group_id, "client_msg_id": req.client_msg_id,
            "message_type": req.message_type, "content": req.content, "extra": req.extra,
            "timestamp": ack.timestamp, "origin_conn": origin_conn,
            "reply_to": str(req.reply_to) if req.reply_to is not None else None,
            "mentions": [str(uid) for uid in req.mentions],
        }, now, since))
        if refused is not None:
            raise refused
        if wait_for_storage:
            ack = self._stored_ack(sender_id, req)
            self.redis.set(key, ack.to_json(), ex=self.dedupe_ttl)
        return ack

    def claim_many(self, items: list[tuple[str, int, str, str, int, str, int | None]]) -> list:
        """Dedupe claims (record key, sender, client_msg_id, pending value, now in ms, the `since` known drained,
        the recipient of a private send or None) in one round trip: for each, [the record's value before,
        "" if this claim made it, or "?" if the sender's records must be rebuilt first; ms since Redis
        remembers; the recipient's block-list lookup (app.accounts.blocks) or None]."""
        script, pipe = self.storage.script(_CLAIM_SCRIPT), self.redis.pipeline(transaction=False)
        for key, sender_id, client_msg_id, pending, now_ms, drained, recipient in items:
            script(keys=[key, DEDUPE_SINCE_KEY, REBUILT_KEY.format(sender_id), RECOVERED_KEY,
                         OLD_RECORDS_KEY.format(sender_id)],
                   args=[pending, self.dedupe_ttl, now_ms, drained, client_msg_id], client=pipe)
            if recipient is not None:
                blocks_lookup(pipe, recipient, sender_id)
        results, answers = iter(pipe.execute()), []
        for *_, recipient in items:
            value, since = next(results)
            answers.append([value, since, next(results) if recipient is not None else None])
        return answers

    def _rebuild(self, sender_id: int, since: int) -> None:
        with self._rebuild_locks[sender_id % len(self._rebuild_locks)]:
            if self.redis.get(REBUILT_KEY.format(sender_id)) in (str(since), str(since).encode()):
                return  # another send of this sender did it meanwhile
            rebuild_sender(self.storage, sender_id, since)

    def _publish_and_record(self, items: list[tuple[dict, float, int]]) -> list:
        """Publish the claims that are young enough and were made in the memory Redis has now
        (the risk window counts on both: nothing claimed before a Redis loss starts its publish
        later than KNOWN_FOR_MS after this gateway last saw the old memory); the others' senders
        get an error to retry with."""
        try:  # (claims of one batch were made in one memory, unless it was lost between them)
            since = self.recovery.known_since(expect=max(claim_since for _, _, claim_since in items))[0]
        except Exception as exc:
            log.warning("%d sends not published, Redis unavailable: %s", len(items), exc.__class__.__name__)
            since = None
        oldest_allowed = self.clock() - self.publish_timeout
        ok = [claimed >= oldest_allowed and claim_since == since for _, claimed, claim_since in items]
        payloads = [p for (p, _, _), good in zip(items, ok) if good]
        if payloads:
            self._publish_many(payloads, deadline=min(c for (_, c, _), good in zip(items, ok) if good)
                               + self.publish_timeout, may_start=lambda: self._memory_unchanged(since))
            self._record_acks(payloads)
        late = Unavailable("message not accepted: the message broker did not take it in time, or Redis "
                           "restarted meanwhile; retry with the same client_msg_id")
        return [None if good else late for good in ok]
    def _memory_unchanged(self, since: int) -> bool:
        """May a publish of claims made in the memory that began at `since` start now? Only while
        Redis was seen to hold it less than KNOWN_FOR_MS ago (asking again when needed)."""
        try:
            known, known_at = self.recovery.known_since(expect=since)
        except Exception:
            return False
        return known == since and (self.clock() - known_at) * 1000 < KNOWN_FOR_MS

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
            user = session.get(User, user_id)
            if user is None or user.deleted_at is not None:
                raise NotFound(f"user {user_id} does not exist")
        if len(self._known_users) > 100_000:
            self._known_users.clear()
        self._known_users.add(user_id)

    def _lookup_stored(self, sender_id: int, client_msg_id: str) -> Ack | None:
        with self.storage.engine.connect() as conn:  # three columns through the unique index
            row = conn.execute(select(Message.id, Message.conversation_id, Message.timestamp).where(
                Message.sender_id == sender_id, Message.client_msg_id == client_msg_id)).first()
        return Ack(client_msg_id, row.id, row.conversation_id, row.timestamp) if row is not None else None

    def _await_window(self, sender_id: int, client_msg_id: str, since: int) -> Ack | None:
        """In the risk window after the loss at `since`: the stored copy of this send as soon as
        there is one, or None once the window closed with none stored (no copy from before the
        loss exists: publish this one). Unavailable if neither happens in time."""
        deadline = time.monotonic() + RECOVERY_ACK_WAIT_SECONDS
        while time.monotonic() < deadline:
            stored = self.stored_acks.wait(sender_id, client_msg_id, 0.05)  # one lookup per tick for all
            if stored is None and not self.recovery.open(since):
                return self._lookup_stored(sender_id, client_msg_id)  # stored just before it closed?
            if stored is not None:
                msg_id, conversation_id, timestamp = stored
                return Ack(client_msg_id, msg_id, conversation_id, timestamp)
        raise Unavailable("message not accepted yet: the pipeline is still catching up after a Redis restart; "
                          "retry with the same client_msg_id")

    def _stored_ack(self, sender_id: int, req: SendRequest) -> Ack:
        """Wait until this send is stored (one lookup per tick for all waiting sends); the ack
        names the copy that was kept."""
        stored = self.stored_acks.wait(sender_id, req.client_msg_id, RECOVERY_ACK_WAIT_SECONDS)
        if stored is None:
            raise Unavailable("message queued but not yet confirmed stored; retry with the same client_msg_id")
        msg_id, conversation_id, timestamp = stored
        return Ack(req.client_msg_id, msg_id, conversation_id, timestamp)
