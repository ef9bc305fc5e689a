"""The private-message path: accept at the gateway, persist, dispatch.

Plain functions over Storage; the gateway and the Celery tasks are thin
adapters around them. Every step is safe to run twice (redelivery).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.conversations import invalidate_conversation_lists
from app.delivery import deliver_frames
from app.errors import ChatError, InvalidInput, NotFound, Unavailable
from app.groups import group_conversation_id, require_sender
from app.snowflake import LeasedIds
from app.presence import Presence
from app.storage import Storage, insert_ignoring_duplicates
from app.sync import append_entries, append_entries_many
from app.unread import count_unread_each
from models import ENTRY_MESSAGE, STATUS_RECALLED, Message, OfflineMessageIndex, SyncEntry, User

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
PREVIEW_CHARS = 200

def private_conversation_id(a: int, b: int) -> str:
    low, high = sorted((a, b))
    return f"p_{low}_{high}"


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

    `publish(payload)` must return only once the broker confirmed the message
    and raise Unavailable otherwise; with `publish_records_acks` it also calls
    `record_acks` for what it published. `claim` may gather the dedupe claims
    of concurrent sends into one `claim_many` (the gateway batches both).

    Dedupe lives in Redis (fast path). Redis may forget (flush, restart), so
    for DEDUPE_TTL after it last did, a miss is checked against MySQL's
    UNIQUE(sender_id, client_msg_id); and for DEDUPE_RECOVERY after it, when a
    first copy may still be queued, the ack waits until the message is stored
    and carries the id that was stored, whichever copy won.
    """

    def __init__(self, storage: Storage, ids: LeasedIds, publish: Callable[[dict], None],
                 clock: Callable[[], float] = time.time, publish_records_acks: bool = False,
                 claim: Callable[[tuple[str, str, int]], list] | None = None):
        self.storage = storage
        self.redis = storage.redis
        self.ids = ids
        self.publish = publish
        self.publish_records_acks = publish_records_acks
        self.claim = claim or (lambda item: self.claim_many([item])[0])
        self.clock = clock
        self.dedupe_ttl = storage.settings.dedupe_ttl_seconds
        self.recovery_seconds = storage.settings.dedupe_recovery_seconds
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
            value, since = self.claim((key, fresh, int(now * 1000)))
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
        self.publish({
            "msg_id": str(ack.msg_id), "conversation_id": conversation_id, "sender_id": sender_id,
            "to": req.to, "group_id": req.group_id, "client_msg_id": req.client_msg_id,
            "message_type": req.message_type, "content": req.content, "extra": req.extra,
            "timestamp": ack.timestamp, "origin_conn": origin_conn,
        })
        if memory_age < self.recovery_seconds:
            ack = self._stored_ack(sender_id, req)
            self.redis.set(key, ack.to_json(), ex=self.dedupe_ttl)
        elif not self.publish_records_acks:
            self.redis.set(key, ack.to_json(), ex=self.dedupe_ttl)
        return ack

    def claim_many(self, items: list[tuple[str, str, int]]) -> list:
        """Dedupe claims (record key, pending value, now in ms) in one round trip: for each,
        [the record's value before, or "" if this claim made it; ms since Redis remembers]."""
        script, pipe = self.storage.script(_CLAIM_SCRIPT), self.redis.pipeline(transaction=False)
        for key, pending, now_ms in items:
            script(keys=[key, DEDUPE_SINCE_KEY], args=[pending, self.dedupe_ttl, now_ms], client=pipe)
        return pipe.execute()

    def record_acks(self, payloads: list[dict]) -> None:
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


# --- persist -----------------------------------------------------------------

class IdCollision(RuntimeError):
    """Two different messages carry one id (a snowflake node used twice)."""


@dataclass(frozen=True)
class PersistOutcome:
    msg_id: int
    stored: bool  # False: this copy was a duplicate and nothing new was written
    dispatch: bool  # whether the message should (still) be dispatched
    collided: bool = False  # another message holds this id: not stored, for an operator


def persist_private_message(storage: Storage, payload: dict) -> PersistOutcome:
    """Store the message and both conversation rows in one transaction.

    Idempotent: a redelivered payload finds its row and only asks for dispatch
    again; a second copy of the same (sender, client_msg_id) under another id
    (possible only after Redis lost the dedupe key) is dropped.
    """
    msg_id = int(payload["msg_id"])
    sender, to = int(payload["sender_id"]), int(payload["to"])
    try:
        with storage.session() as session:
            session.execute(insert(Message), [_message_row(payload)])
            preview = message_preview(payload["message_type"], payload["content"])
            upsert_conversations(session, storage.is_mysql, [  # in user order: one lock order, no deadlocks
                {"conversation_id": payload["conversation_id"], "user_id": user_id, "target_id": peer,
                 "is_group": False, "last_message": preview, "last_message_time": int(payload["timestamp"]),
                 "last_msg_id": msg_id} for user_id, peer in sorted([(sender, to), (to, sender)])])
            append_entries(session, storage.is_mysql, [sender, to], msg_id, payload["conversation_id"])
        invalidate_conversation_lists(storage, [sender, to])
        return PersistOutcome(msg_id, stored=True, dispatch=True)
    except IntegrityError:
        existing, original = stored_copy(storage, msg_id, sender, payload["client_msg_id"])
        if existing is not None:
            invalidate_conversation_lists(storage, [sender, to])  # the first attempt may have died before it
            return PersistOutcome(msg_id, stored=False, dispatch=True)
        if original is not None:
            return PersistOutcome(original, stored=False, dispatch=False)
        raise


def persist_private_messages(storage: Storage, payloads: list[dict]) -> list[PersistOutcome]:
    """Store many private messages in one transaction: one commit, one sequence bump
    per user, multi-row inserts. This is what makes persist keep up under load.

    Taken for the common case, all of them new. If any is already stored (a
    redelivery, or a second copy of a send), the batch is rolled back and each
    message goes through `persist_private_message` on its own, which knows
    every case; one whose id another message holds (IdCollision) comes back
    `collided`, for the caller to set aside, so it cannot hold up the others.
    """
    if len(payloads) <= 1:
        return [persist_private_message(storage, payload) for payload in payloads]
    try:
        with storage.session() as session:
            session.execute(insert(Message), [_message_row(payload) for payload in payloads])
            newest: dict[tuple[int, str], dict] = {}  # one row per (user, conversation): its newest message
            for payload in payloads:
                sender, to, msg_id = int(payload["sender_id"]), int(payload["to"]), int(payload["msg_id"])
                for user_id, peer in ((sender, to), (to, sender)):
                    key = (user_id, payload["conversation_id"])
                    if key not in newest or newest[key]["last_msg_id"] < msg_id:
                        newest[key] = {
                            "conversation_id": payload["conversation_id"], "user_id": user_id, "target_id": peer,
                            "is_group": False, "last_msg_id": msg_id, "last_message_time": int(payload["timestamp"]),
                            "last_message": message_preview(payload["message_type"], payload["content"])}
            upsert_conversations(session, storage.is_mysql, [newest[key] for key in sorted(newest)])  # lock order
            append_entries_many(session, storage.is_mysql, [
                ([int(p["sender_id"]), int(p["to"])], int(p["msg_id"]), p["conversation_id"]) for p in payloads])
    except IntegrityError:
        log.info("batch of %d holds a message stored before; persisting one by one", len(payloads))
        return [_persist_alone(storage, payload) for payload in payloads]
    invalidate_conversation_lists(storage, [int(p[k]) for p in payloads for k in ("sender_id", "to")])
    return [PersistOutcome(int(p["msg_id"]), stored=True, dispatch=True) for p in payloads]


def _persist_alone(storage: Storage, payload: dict) -> PersistOutcome:
    try:
        return persist_private_message(storage, payload)
    except IdCollision:
        return PersistOutcome(int(payload["msg_id"]), stored=False, dispatch=False, collided=True)


def _message_row(payload: dict) -> dict:
    return {"id": int(payload["msg_id"]), "conversation_id": payload["conversation_id"],
            "sender_id": int(payload["sender_id"]), "receiver_id": int(payload["to"]), "group_id": None,
            "client_msg_id": payload["client_msg_id"], "message_type": payload["message_type"],
            "content": payload["content"], "extra": payload.get("extra") or None, "is_group": False,
            "timestamp": int(payload["timestamp"])}


def stored_copy(storage: Storage, msg_id: int, sender: int, client_msg_id: str) -> tuple[Message | None, int | None]:
    """After a failed insert: (this message, already stored: a redelivery) or (None, the id of
    another copy of the same send, dropped); (None, None) if neither explains the failure.

    Raises IdCollision when another message holds this id (two gateways made one id):
    never drop either silently.
    """
    with storage.sessions() as session:
        existing = session.get(Message, msg_id)
        if existing is not None and (existing.sender_id, existing.client_msg_id) != (sender, client_msg_id):
            log.critical("msg id %s collides with another message; dead-lettered for an operator", msg_id)
            raise IdCollision(f"msg id {msg_id} is taken by another message")
        if existing is not None:
            log.info("msg %s already persisted (redelivery)", msg_id)
            return existing, None
        original = session.scalar(select(Message.id).where(
            Message.sender_id == sender, Message.client_msg_id == client_msg_id))
    if original is not None:
        log.warning("msg %s is a second copy of msg %s (same client_msg_id); dropped", msg_id, original)
    return None, original


def message_preview(message_type: str, content: str, limit: int = PREVIEW_CHARS) -> str:
    """What a list or a notification shows of a message: its text, or its kind."""
    return content[:limit] if message_type == "text" else f"[{message_type}]"


_UPSERT_SQL = {
    # Only VALUES() references after ON DUPLICATE KEY: PyMySQL then sends many
    # rows as one multi-row INSERT. MySQL assigns left to right: last_msg_id last.
    "mysql": """
        INSERT INTO conversation (conversation_id, user_id, target_id, is_group, last_message,
                                  last_message_time, last_msg_id, unread_count)
        VALUES (:conversation_id, :user_id, :target_id, :is_group, :last_message, :last_message_time,
                :last_msg_id, :unread_count)
        ON DUPLICATE KEY UPDATE
          last_message = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), VALUES(last_message), last_message),
          last_message_time = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), VALUES(last_message_time),
                                 last_message_time),
          updated_at = IF(VALUES(last_msg_id) > COALESCE(last_msg_id, 0), NOW(), updated_at),
          last_msg_id = GREATEST(COALESCE(last_msg_id, 0), VALUES(last_msg_id))""",
    "sqlite": """
        INSERT INTO conversation (conversation_id, user_id, target_id, is_group, last_message,
                                  last_message_time, last_msg_id, unread_count, created_at, updated_at)
        VALUES (:conversation_id, :user_id, :target_id, :is_group, :last_message, :last_message_time,
                :last_msg_id, :unread_count, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)
        ON CONFLICT (user_id, conversation_id) DO UPDATE SET
          last_message = excluded.last_message, last_message_time = excluded.last_message_time,
          last_msg_id = excluded.last_msg_id, updated_at = CURRENT_TIMESTAMP
        WHERE excluded.last_msg_id > COALESCE(conversation.last_msg_id, 0)""",
}


def upsert_conversations(session: Session, is_mysql: bool, rows: list[dict]) -> None:
    """Create each user's row for a conversation, or move it to this message if newer.

    rows: conversation_id, user_id, target_id, is_group, last_message,
    last_message_time, last_msg_id. Commits land out of id order, so an
    older message never overwrites a newer one.
    """
    if rows:
        session.execute(text(_UPSERT_SQL["mysql" if is_mysql else "sqlite"]),
                        [dict(row, unread_count=0) for row in rows])


# --- dispatch ----------------------------------------------------------------

def message_frame(msg: Message) -> dict:
    """The live `message` frame (docs/protocol.md); ids as strings."""
    return {
        "type": "message", "msg_id": str(msg.id), "client_msg_id": msg.client_msg_id,
        "conversation_id": msg.conversation_id, "from": str(msg.sender_id),
        "to": str(msg.receiver_id) if msg.receiver_id is not None else None,
        "group_id": str(msg.group_id) if msg.group_id is not None else None,
        "message_type": msg.message_type, "content": msg.content if msg.status != STATUS_RECALLED else "",
        "extra": msg.extra or {}, "timestamp": msg.timestamp, "status": msg.status,
    }


@dataclass
class DispatchOutcome:
    msg_id: int
    live_connections: int = 0
    offline_users: list[int] = field(default_factory=list)


def dispatch_private_message(storage: Storage, msg_id: int, origin_conn: str | None) -> DispatchOutcome:
    """Live delivery to every connection of both parties (not the sending one),
    unread for the recipient, offline index + push for an offline recipient.

    Returns which users are offline; the caller enqueues their pushes.
    """
    return dispatch_private_messages(storage, [(msg_id, origin_conn)])[0]


def dispatch_private_messages(storage: Storage, items: list[tuple[int, str | None]]) -> list[DispatchOutcome]:
    """`dispatch_private_message` for many messages (msg id, sending connection) at once:
    one read of the messages and their stream positions, one presence lookup, one
    Redis round trip for the live frames and one for unread, one offline-index insert."""
    ids = [msg_id for msg_id, _ in items]
    with storage.sessions() as session:
        messages = {msg.id: msg for msg in session.scalars(select(Message).where(Message.id.in_(ids)))}
        positions = {(uid, mid): seq for uid, mid, seq in session.execute(
            select(SyncEntry.user_id, SyncEntry.message_id, SyncEntry.seq).where(
                SyncEntry.message_id.in_(ids), SyncEntry.kind == ENTRY_MESSAGE))}
    missing = [mid for mid in ids if mid not in messages or (messages[mid].receiver_id, mid) not in positions]
    if missing:
        raise LookupError(f"msg {', '.join(map(str, missing))} is not persisted")
    live = Presence(storage.redis, storage.settings.presence_ttl_seconds).live_connections(
        uid for mid in ids for uid in (messages[mid].receiver_id, messages[mid].sender_id))
    deliveries, outcomes, offline = [], [], []
    for msg_id, origin_conn in items:
        msg, outcome = messages[msg_id], DispatchOutcome(msg_id)
        targets: dict[str, list[str]] = {}
        for conn in live[msg.receiver_id] + live[msg.sender_id]:
            if conn.conn_id != origin_conn:
                targets.setdefault(conn.gateway_id, []).append(conn.conn_id)
        outcome.live_connections = sum(map(len, targets.values()))
        deliveries.append((message_frame(msg), targets))
        if not live[msg.receiver_id]:
            offline.append({"user_id": msg.receiver_id, "message_id": msg_id, "conversation_id": msg.conversation_id})
            outcome.offline_users.append(msg.receiver_id)
        outcomes.append(outcome)
    deliver_frames(storage.redis, deliveries)
    if offline:
        with storage.session() as session:  # a redelivery finds its rows there
            session.execute(insert_ignoring_duplicates(OfflineMessageIndex, storage.is_mysql), offline)
    # Last: a visible sign that dispatch ran.
    count_unread_each(storage, [(messages[mid].receiver_id, mid, messages[mid].conversation_id,
                                 positions[(messages[mid].receiver_id, mid)]) for mid, _ in items])
    return outcomes
