"""One gateway process: its sockets, its delivery channel, its presence.

Threads here are greenlets under gunicorn's gevent worker (monkey-patched);
the code also runs with real threads under a plain WSGI server.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid

import gevent
from simple_websocket import ConnectionClosed

from app import metrics
from app.accounts.sessions import open_sessions
from app.accounts.status import active_among
from app.config import Settings
from app.errors import ChatError, InvalidInput, RateLimited
from app.chat.delivery import deliver_to_users
from app.chat.intake import MessageIntake
from app.media.uploads import check_attachment
from app.chat.receipts import mark_read, mark_received
from app.chat.recall import recall_message
from app.chat.edits import edit_message
from app.chat.reactions import react
from app.chat.typing import RecentTyping, relay_typing
from app.chat.sync import LATEST, parse_cursor, parse_limit, read_stream, stream_end
from app.chat.presence import DELIVERY_CHANNEL, Presence, now_ms
from app.ratelimit import Limit, LocalBucket, take
from app.ids import LeasedIds, NodeLease
from app.storage import Storage
from app.wire import (
    ack_frame, error_frame, message_frame, parse_envelope, read_ok_frame, receipt_frame, recalled_frame,
    edited_frame, reaction_frame,
)
from ws.frames import (
    check_clock, client_msg_id_of, parse_frame, parse_id, parse_read, parse_send, parse_typing,
    parse_edit, parse_react,
)

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 1000  # frames queued for one slow client before we drop it (it will resync)
CLOSE_TOKEN_EXPIRED = 4401
CLOSE_HEARTBEAT_TIMEOUT = 4408
CLOSE_TOO_SLOW = 4429
CLOSE_RESYNC = 4503
CLOSE_SERVICE_RESTART = 1012  # RFC 6455 registry: reconnect, to another gateway
CLOSE_POLICY_VIOLATION = 1008  # kept flooding after being told to slow down
DRAIN_FLUSH_SECONDS = 5
GATEWAY_ALIVE_EVERY = 5
LEASE_RENEW_EVERY = 20
# Frames that change what is stored about earlier messages: a connection handles them in their
# own order beside its other frames, so a send is never held up behind an edit's transaction
# (docs/protocol.md §1). Their answers are also live frames, and their errors name the frame's
# client_msg_id.
BESIDE_SENDS = frozenset({"edit", "react", "received"})
OVERTAKE_LANE = frozenset({"ping", "typing"})  # and `send`: frames that change nothing stored before them
BESIDE_SENDS_QUEUE = 32  # frames waiting on one connection's lane before its reader waits too


class Lane:
    """One connection's frames of BESIDE_SENDS, run one at a time in arrival order by a greenlet
    that lives while there is work. A full lane makes the reader wait: the frame budget and
    this bound keep one client from queueing without end."""

    def __init__(self):
        self._work: collections.deque = collections.deque()
        self._worker = None
        self._room = threading.Semaphore(BESIDE_SENDS_QUEUE)

    def put(self, job) -> None:
        self._room.acquire()
        self._work.append(job)
        if self._worker is None:  # greenlets switch only where they block: no race with the worker's exit
            self._worker = gevent.spawn(self._run)

    def idle(self) -> bool:
        return self._worker is None

    def join(self, timeout: float | None) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _run(self) -> None:
        try:
            while self._work:
                job = self._work.popleft()
                try:
                    job()
                finally:
                    self._room.release()
        finally:
            self._worker = None


class Connection:
    """One client socket. Every outgoing frame goes through its outbox and writer."""

    def __init__(self, ws, user_id: int, conn_id: str, gateway_id: str, frame_limit: Limit,
                 session_id: str = ""):
        self.ws = ws
        self.frames = LocalBucket(frame_limit)
        self.session_id = session_id  # the login session whose token opened it (app.accounts.sessions)
        self.refused_in_a_row = 0
        self.recent_typing: RecentTyping | None = None  # made at its first typing frame
        self.user_id = user_id
        self.conn_id = conn_id
        self.gateway_id = gateway_id
        self.connected_at = now_ms()
        self.busy = False  # handling a frame: a drain waits for its answer
        self.lane: Lane | None = None  # its edits, reactions and receipts (BESIDE_SENDS); made by the first one
        self.close_code: int | None = None  # the code this gateway closed the socket with
        # Frames wait here for the writer, a greenlet that runs only while there is
        # something to write: an idle connection holds no writer (memory per socket).
        self._outbox: collections.deque = collections.deque()
        self._writer: gevent.Greenlet | None = None
        self._accepting = True

    def run_beside(self, job) -> None:
        """Queue one BESIDE_SENDS frame's handling on this connection's lane."""
        if self.lane is None:
            self.lane = Lane()
        self.lane.put(job)

    def wait_beside(self, timeout: float | None) -> None:
        """Until the lane's queued frames are handled (at most `timeout` s; None: as long as it takes)."""
        if self.lane is not None:
            self.lane.join(timeout)

    def send(self, frame: dict | str) -> None:
        data = frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False)
        if len(self._outbox) >= OUTBOX_LIMIT:
            log.warning("conn %s: client too slow, %d frames queued; closing", self.conn_id, OUTBOX_LIMIT)
            self.close(CLOSE_TOO_SLOW, "too slow: reconnect and sync")
            return
        self._queue(data)

    def close(self, code: int, reason: str) -> None:
        try:
            self.ws.close(reason=code, message=reason)
            self.close_code = self.close_code or code
        except Exception:  # already closed
            pass

    def close_after_queued(self, code: int, reason: str) -> None:
        """Close once the frames already queued (an ack, say) are written; never blocks the caller."""
        self._queue(_Close(code, reason))

    def flush(self, timeout: float) -> None:
        """Wait until the writer has written everything queued (and any close queued)."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    def stop(self) -> None:
        """No more frames; what is queued is still written (if the socket is open)."""
        self._accepting = False

    def _queue(self, item) -> None:
        if not self._accepting:
            return
        self._outbox.append(item)
        if self._writer is None:  # greenlets switch only where they block: no race with the writer's exit
            self._writer = gevent.spawn(self._write_loop)

    def _write_loop(self) -> None:
        try:
            while self._outbox:
                data = self._outbox.popleft()
                if isinstance(data, _Close):
                    self._accepting = False
                    self.close(data.code, data.reason)
                    return
                if not self.ws.connected:
                    return
                try:
                    self.ws.send(data)
                    metrics.frame_out(data)
                except (ConnectionClosed, OSError):
                    self._accepting = False
                    return
        finally:
            self._writer = None
            if not self._accepting:
                self._outbox.clear()


class _Close:
    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class Gateway:
    def __init__(self, settings: Settings, storage: Storage):
        self.settings = settings
        self.storage = storage
        self.gateway_id = settings.gateway_id
        self.presence = Presence(storage.redis, settings.presence_ttl_seconds)
        self.connections: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._started = False
        self.draining = False
        self.ids: LeasedIds | None = None
        self.intake: MessageIntake | None = None
        self.send_limit = Limit(settings.send_rate_per_second, settings.send_burst)
        self._handlers = {"ping": self._on_ping, "send": self._on_send, "sync": self._on_sync,
                          "read": self._on_read, "received": self._on_received, "recall": self._on_recall,
                          "typing": self._on_typing, "edit": self._on_edit, "react": self._on_react}
        metrics.serve_frame_types(self._handlers)

    # -- lifecycle ------------------------------------------------------------

    def _ensure_started(self) -> None:
        """Start background work in the serving process (after gunicorn forked)."""
        with self._lock:
            if self._started:
                return
            from tasks.publish import PersistPublisher  # here: a process that never serves a socket loads no broker

            self.ids = LeasedIds(NodeLease(self.storage.redis))
            publisher = PersistPublisher(self.settings.publish_timeout_seconds)
            self.intake = MessageIntake(self.storage, self.ids, publisher.publish_all, probe=publisher.probe)
            # Redis lost its memory: presence back at once (dispatch would take recipients for offline).
            self.intake.recovery.start_watching(on_loss=self._refresh_presence)
            self.presence.mark_gateway_alive(self.gateway_id)
            threading.Thread(target=self._delivery_loop, daemon=True, name="delivery").start()
            threading.Thread(target=self._maintenance_loop, daemon=True, name="maintenance").start()
            self._started = True
            if not self._subscribed.wait(5):  # serve only once dispatch can reach us
                log.warning("gateway %s: delivery channel not subscribed yet", self.gateway_id)
            log.info("gateway %s serving (snowflake node %d)", self.gateway_id, self.ids.node_id)

    def _delivery_loop(self) -> None:
        """Frames that dispatch addressed to this gateway's connections."""
        channel = DELIVERY_CHANNEL.format(self.gateway_id)
        while True:
            pubsub = self.storage.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                self._subscribed.set()
                self._refresh_presence()  # Redis may have been flushed while we were away
                for item in pubsub.listen():
                    if item.get("type") == "message":
                        self._deliver_envelope(item["data"])
            except Exception as exc:
                log.warning("gateway %s: delivery channel lost (%s); resubscribing", self.gateway_id,
                            exc.__class__.__name__)
                self._subscribed.clear()
                # Frames sent meanwhile are gone: tell every client to reconnect and sync.
                for conn in list(self.connections.values()):
                    conn.close(CLOSE_RESYNC, "live delivery interrupted: reconnect and sync")
                time.sleep(1)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _deliver_envelope(self, raw: str) -> None:
        """One envelope from this gateway's delivery channel (app.wire): a frame for some of
        our connections, or a request to close them."""
        try:
            conn_ids, frame, close_code, reason, sessions = parse_envelope(raw)
        except ValueError:
            log.error("gateway %s: malformed delivery envelope dropped", self.gateway_id)
            return
        for conn_id in conn_ids:
            conn = self.connections.get(conn_id)
            if conn is None:
                continue
            if sessions is not None and conn.session_id not in sessions:
                continue  # a session ended: the user's sockets of other sessions stay
            if close_code is not None:  # an account cut off (app.accounts.status)
                log.info("conn %s: closed (%s)", conn_id, reason)
                conn.close_after_queued(close_code, reason)
            else:
                conn.send(frame)

    def _maintenance_loop(self) -> None:
        last_lease = last_presence = last_accounts = time.monotonic()
        while True:
            time.sleep(GATEWAY_ALIVE_EVERY)
            if self.draining:
                return
            try:
                remembered = self.presence.mark_gateway_alive(self.gateway_id)
                now = time.monotonic()
                if not remembered:  # Redis was flushed or restarted: put our connections back now
                    self._refresh_presence()
                    last_presence = now
                if now - last_lease >= LEASE_RENEW_EVERY:
                    self.ids.renew()
                    last_lease = now
                if now - last_presence >= self.settings.heartbeat_interval_seconds:
                    self._refresh_presence()
                    last_presence = now
                if now - last_accounts >= self.settings.account_check_seconds:
                    self._close_inactive_accounts()
                    last_accounts = now
            except Exception as exc:
                log.warning("gateway %s: maintenance failed (%s); retrying", self.gateway_id, exc.__class__.__name__)

    def _close_inactive_accounts(self) -> None:
        """Sockets of accounts deleted or disabled, or of sessions ended, since they connected are
        closed (4401): the backstop of the closes sent through the delivery channel."""
        conns = list(self.connections.values())
        active = active_among(self.storage, [c.user_id for c in conns])
        live = open_sessions(self.storage, [c.session_id for c in conns if c.session_id])
        for conn in conns:
            if conn.user_id not in active:
                log.info("conn %s: account %s is gone or disabled; closing", conn.conn_id, conn.user_id)
                conn.close_after_queued(CLOSE_TOKEN_EXPIRED, "account disabled or deleted")
            elif conn.session_id and conn.session_id not in live:
                log.info("conn %s: session %s ended; closing", conn.conn_id, conn.session_id)
                conn.close_after_queued(CLOSE_TOKEN_EXPIRED, "session ended: log in again")

    def _refresh_presence(self) -> None:
        conns = list(self.connections.values())
        if conns:  # marks this gateway alive before its entries (see Presence.refresh)
            self.presence.refresh([(c.user_id, c.conn_id, c.gateway_id, c.connected_at) for c in conns])
        else:
            self.presence.mark_gateway_alive(self.gateway_id)

    def drain(self) -> None:
        """Stop serving: clients reconnect elsewhere, dispatch stops routing here."""
        if self.draining:
            return
        self.draining = True
        log.info("gateway %s draining %d connections", self.gateway_id, len(self.connections))
        try:
            self.presence.mark_gateway_gone(self.gateway_id)  # new messages go offline-path right away
        except Exception as exc:
            log.warning("gateway %s: could not withdraw liveness (%s)", self.gateway_id, exc.__class__.__name__)
        for conn in list(self.connections.values()):
            if not conn.busy:  # a busy one closes itself once its frame is answered
                if conn.lane is None or conn.lane.idle():
                    self._close_for_restart(conn)
                else:  # not in this loop: the lane's frames may take a while
                    gevent.spawn(self._close_for_restart, conn)

    @staticmethod
    def _close_for_restart(conn: Connection) -> None:
        conn.wait_beside(DRAIN_FLUSH_SECONDS)  # the edits, reactions and receipts it queued are answered first
        conn.close_after_queued(CLOSE_SERVICE_RESTART, "gateway restarting: reconnect")

    # -- one socket -----------------------------------------------------------

    def serve(self, ws, user_id: int, token_expires_at: int, remote_addr: str | None,
              session_id: str = "") -> None:
        """Run one authenticated connection until it closes."""
        self._ensure_started()
        conn = Connection(ws, user_id, f"{self.gateway_id}-{uuid.uuid4().hex[:16]}", self.gateway_id,
                          Limit(self.settings.frame_rate_per_second, self.settings.frame_burst), session_id)
        self.connections[conn.conn_id] = conn  # registered before the check: a drain cannot miss it
        if self.draining:
            self.connections.pop(conn.conn_id, None)
            conn.close_after_queued(CLOSE_SERVICE_RESTART, "gateway restarting: reconnect")
            conn.flush(DRAIN_FLUSH_SECONDS)
            return
        try:
            metrics.connection_opened()
            self.presence.connect(user_id, conn.conn_id, self.gateway_id, conn.connected_at)
            log.info("conn %s opened: user %s from %s", conn.conn_id, user_id, remote_addr)
            hello = {"type": "hello", "user_id": str(user_id), "conn_id": conn.conn_id,
                     "gateway_id": self.gateway_id, "heartbeat_interval": self.settings.heartbeat_interval_seconds}
            conn.send(hello)
            idle_limit = self.settings.heartbeat_interval_seconds * 3
            while True:
                token_left = token_expires_at - time.time()
                if token_left <= 0:
                    log.info("conn %s: token expired; closing", conn.conn_id)
                    conn.close(CLOSE_TOKEN_EXPIRED, "token expired: log in again and reconnect")
                    break
                raw = ws.receive(timeout=min(idle_limit, token_left))
                if raw is not None:
                    conn.busy = True
                    self.handle_frame(conn, raw)
                    conn.busy = False
                    if self.draining:  # the frame in progress was answered: send that answer, then go
                        self._close_for_restart(conn)
                        conn.flush(DRAIN_FLUSH_SECONDS)
                        break
                elif token_left > idle_limit:
                    log.info("conn %s: no frame for %ds; closing", conn.conn_id, idle_limit)
                    conn.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                    break
        except ConnectionClosed as closed:
            log.info("conn %s closed by peer (%s)", conn.conn_id, getattr(closed, "reason", ""))
        finally:
            metrics.connection_closed(conn.close_code or ws.close_reason)
            self.connections.pop(conn.conn_id, None)
            conn.stop()
            try:
                self.presence.disconnect(user_id, conn.conn_id)
            except Exception:  # the entry expires with its TTL
                log.warning("conn %s: presence entry not removed (Redis unavailable)", conn.conn_id)

    def handle_frame(self, conn: Connection, raw) -> None:
        frame: dict = {}
        try:
            refused = self._admit(conn)  # every frame counts, malformed ones too
            if refused is not None:
                try:  # only to name the refused send's client_msg_id in the answer
                    frame = parse_frame(raw)
                except ChatError:
                    pass
                raise refused
            frame = parse_frame(raw)
            check_clock(frame, now_ms(), self.settings.frame_max_clock_skew_seconds)
            kind = frame["type"]
            handler = self._handlers.get(kind)
            if handler is None:
                raise InvalidInput(f"unknown frame type {kind!r}")
            if kind in BESIDE_SENDS:
                conn.run_beside(lambda: self._handle_beside(conn, handler, frame))
            elif kind == "send":
                with metrics.timed_send():
                    handler(conn, frame)
            else:
                if kind not in OVERTAKE_LANE:
                    conn.wait_beside(None)  # a read, recall or sync sees the edits and receipts sent before it
                handler(conn, frame)
        except Exception as exc:
            self._answer_failure(conn, frame, exc)
        finally:
            metrics.frame_in(frame.get("type"))

    def _handle_beside(self, conn: Connection, handler, frame: dict) -> None:
        try:
            handler(conn, frame)
        except Exception as exc:
            self._answer_failure(conn, frame, exc)

    def _answer_failure(self, conn: Connection, frame: dict, exc: Exception) -> None:
        if isinstance(exc, ChatError):
            conn.send(error_frame(exc.code, exc.message, client_msg_id_of(frame), exc.retry_after_ms))
            return
        log.error("conn %s: frame handling failed", conn.conn_id, exc_info=exc)
        conn.send(error_frame("internal", "internal error; retry later", client_msg_id_of(frame)))

    def _admit(self, conn: Connection) -> RateLimited | None:
        """The connection's frame budget: a refused frame gets rate_limited; a flood is cut off."""
        if self.settings.frame_rate_per_second <= 0:
            return None
        wait_ms = conn.frames.take()
        if not wait_ms:
            conn.refused_in_a_row = 0
            return None
        conn.refused_in_a_row += 1
        if conn.refused_in_a_row >= self.settings.flood_close_after:
            log.warning("conn %s: flooding (%d frames refused in a row); closing", conn.conn_id,
                        conn.refused_in_a_row)
            conn.close_after_queued(CLOSE_POLICY_VIOLATION, "flooding: too many frames")
        return RateLimited(f"too many frames on this connection; retry in {max(0.1, wait_ms / 1000):.1f} s",
                           retry_after_ms=wait_ms)

    def _on_ping(self, conn: Connection, frame: dict) -> None:
        # No presence write here: the maintenance loop rewrites every connection's entry
        # each heartbeat interval, in chunks (a Redis round trip per ping was a third of
        # an idle gateway's CPU, docs/benchmarks.md).
        conn.send({"type": "pong"})

    def _on_send(self, conn: Connection, frame: dict) -> None:
        req = parse_send(frame, self.settings.message_max_content_bytes)
        take(self.storage, "send", conn.user_id, self.send_limit, "messages")
        check_attachment(self.storage, conn.user_id, req.message_type, req.extra)  # image/file: the sender's upload
        ack = self.intake.accept(conn.user_id, conn.conn_id, req)
        log.info("conn %s: msg %s acked", conn.conn_id, ack.msg_id)
        conn.send(ack_frame(ack.client_msg_id, ack.msg_id, ack.conversation_id, ack.timestamp))

    def _on_sync(self, conn: Connection, frame: dict) -> None:
        if frame.get("cursor") == LATEST:  # a new device starts from now
            parse_limit(frame.get("limit"))
            conn.send({"type": "sync_batch", "messages": [], "cursor": stream_end(self.storage, conn.user_id),
                       "has_more": False})
            return
        page = read_stream(self.storage, conn.user_id, parse_cursor(frame.get("cursor")),
                           parse_limit(frame.get("limit")), message_frame)
        conn.send({"type": "sync_batch", "messages": page.entries, "cursor": page.cursor, "has_more": page.has_more})

    def _on_read(self, conn: Connection, frame: dict) -> None:
        conversation_id, msg_id = parse_read(frame)
        outcome = mark_read(self.storage, conn.user_id, conversation_id, msg_id)
        read_ok = read_ok_frame(conversation_id, msg_id)
        conn.send(read_ok)
        deliver_to_users(self.storage, read_ok, [conn.user_id], skip_conn=conn.conn_id)  # the reader's other devices
        if outcome.peer is not None:
            deliver_to_users(self.storage, receipt_frame(conversation_id, conn.user_id, msg_id, "read",
                                                         outcome.timestamp), [outcome.peer])
        self._sync_badges([conn.user_id], msg_id, conn)
        log.info("conn %s: read %s up to msg %s", conn.conn_id, conversation_id, msg_id)

    def _on_received(self, conn: Connection, frame: dict) -> None:
        conversation_id, msg_id = parse_read(frame)
        outcome = mark_received(self.storage, conn.user_id, conversation_id, msg_id)
        if outcome.peer is not None:  # only when the position moved: a repeat tells nobody
            deliver_to_users(self.storage, receipt_frame(conversation_id, conn.user_id, msg_id, "delivered",
                                                         outcome.timestamp), [outcome.peer])
        log.debug("conn %s: received %s up to msg %s", conn.conn_id, conversation_id, msg_id)

    def _on_recall(self, conn: Connection, frame: dict) -> None:
        outcome = recall_message(self.storage, conn.user_id, parse_id(frame.get("msg_id"), "msg_id"))
        recalled = recalled_frame(outcome.msg_id, outcome.conversation_id, by=outcome.by)
        conn.send(recalled)
        deliver_to_users(self.storage, recalled, outcome.parties, skip_conn=conn.conn_id)
        self._sync_badges([uid for uid in outcome.parties if uid != conn.user_id], outcome.msg_id, conn)
        log.info("conn %s: msg %s recalled", conn.conn_id, outcome.msg_id)

    def _on_typing(self, conn: Connection, frame: dict) -> None:
        # No answer: a relayed or dropped typing frame is invisible to its sender (docs/protocol.md §20).
        conversation_id, state = parse_typing(frame)
        if conn.recent_typing is None:
            conn.recent_typing = RecentTyping()
        if conn.recent_typing.may_relay(conversation_id, state):
            relay_typing(self.storage, conn.user_id, conversation_id, state)
            conn.recent_typing.relayed(conversation_id, state)

    def _on_edit(self, conn: Connection, frame: dict) -> None:
        msg_id, content = parse_edit(frame, self.settings.message_max_content_bytes)
        take(self.storage, "edit", conn.user_id, self.send_limit, "edits")  # its own budget: sends are not slowed
        outcome = edit_message(self.storage, conn.user_id, msg_id, content, self.settings.message_edit_window_seconds)
        edited = edited_frame(outcome.msg_id, outcome.conversation_id, outcome.content, outcome.edited_at)
        conn.send(edited)  # the answer: the same frame every party gets
        deliver_to_users(self.storage, edited, outcome.parties, skip_conn=conn.conn_id)
        log.info("conn %s: msg %s edited (edit %s)", conn.conn_id, outcome.msg_id, outcome.edit_id)

    def _on_react(self, conn: Connection, frame: dict) -> None:
        msg_id, emoji, op = parse_react(frame)
        take(self.storage, "react", conn.user_id, self.send_limit, "reactions")
        outcome = react(self.storage, conn.user_id, msg_id, emoji, op)
        reaction = reaction_frame(outcome.msg_id, outcome.conversation_id, conn.user_id, outcome.emoji, outcome.op)
        conn.send(reaction)  # the answer, also when nothing changed
        if outcome.changed:
            deliver_to_users(self.storage, reaction, outcome.parties, skip_conn=conn.conn_id)
        log.info("conn %s: reaction %s on msg %s (%s)", conn.conn_id, op,
                 outcome.msg_id, "changed" if outcome.changed else "unchanged")

    def _sync_badges(self, user_ids: list[int], msg_id: int, conn: Connection) -> None:
        """Badge sync and withdrawal on the users' devices that show a notification (docs/push.md §4.4).
        The read or recall stands whatever happens here: a failure only costs a stale badge."""
        from tasks.publish import queue_badge_syncs  # as PersistPublisher: loaded by socket-serving processes

        try:
            queued = queue_badge_syncs(self.storage, user_ids, msg_id)
        except Exception as exc:  # Redis or the broker: the frame was answered already
            log.warning("conn %s: badge sync after msg %s not queued: %s", conn.conn_id, msg_id,
                        type(exc).__name__)
            return
        if queued:
            log.info("conn %s: badge sync of %d user(s) queued after msg %s", conn.conn_id, len(queued), msg_id)

