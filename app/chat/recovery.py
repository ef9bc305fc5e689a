"""After Redis lost its memory: how long a send is at risk, and what is recovered from MySQL.

Redis may forget the dedupe records at any time (flush, restart, failover, a new
deployment). From then on (`dedupe:since`, S) two things can make a retry get a
different msg_id than its first attempt:

1. The first copy is still queued (published before the loss, not stored yet).
   Until every message published before the loss has been stored, a send's ack
   waits until it is stored and names the copy MySQL kept (persist keeps one row
   per (sender, client_msg_id)). That is the *risk window*: it closes when the
   persist pipeline has drained past the loss (`drain_verdict`), which on a
   healthy pipeline is the publish grace plus milliseconds.
2. The first copy is stored. Once the window is closed every copy from before the
   loss is stored, so a sender's records are rebuilt into Redis from MySQL once
   per sender per loss (`rebuild_sender`, marker `dedupe:rebuilt:{uid}`), into a
   hash read only when a send has no record, so a record made since the loss
   is never overwritten; and when the
   database holds no message from the dedupe window before the loss there is
   nothing to rebuild (`dedupe:recovered`).

"Drained past the loss" is proven from the persist workers' own reports
(tasks/persist_progress.py), one per worker process every REPORT_INTERVAL: the
oldest message timestamp it holds unsettled (buffered, in a batch, a retry held
for its countdown) and, per persist queue, the report in which it first received
a message published after the threshold T (a message of a later claim, or a
probe a gateway publishes once T passed). docs/reliability.md gives the argument.
No Flask, Celery or gateway imports here.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import select, tuple_

from app.ids import EPOCH_MS, NODE_BITS, SEQUENCE_BITS
from app.storage import Storage
from models import Message

log = logging.getLogger(__name__)

PERSIST_QUEUES = ("private_messages", "group_messages")
DEDUPE_SINCE_KEY = "dedupe:since"  # ms when this Redis started remembering sends (S)
WORKERS_KEY = "persist:workers"  # set of the report keys below
WORKER_KEY = "persist:worker:{}"  # "<seq> <redis ms> <json>" per persist worker process, EX WORKER_TTL_SECONDS
SEQ_KEY = "persist:seq"  # orders the reports
REISSUED_KEY = "persist:reissued"  # ms of the last time a message from before the loss went back to a queue
PROBED_KEY = "persist:probed:{}"  # a gateway published the probes for this threshold
REBUILT_KEY = "dedupe:rebuilt:{}"  # uid -> the `dedupe:since` its records were rebuilt for
OLD_RECORDS_KEY = "dedupe:old:{}"  # uid -> hash client_msg_id -> ack JSON of its sends from before the loss
RECOVERED_KEY = "dedupe:recovered"  # the `dedupe:since` for which MySQL held nothing to rebuild
DRAINED_KEY = "dedupe:drained:{}"  # gateway id -> the `dedupe:since` whose risk window it saw close

SKEW_MS = 1000  # clocks of gateways and workers may differ by this much
REPORT_INTERVAL = 0.2
STALE_MS = 3000  # a report older than this: its worker is dead or hung
# By then the broker has given a dead worker's messages back to the queue: it closes a silent
# connection after two missed heartbeats (celeryconfig broker_heartbeat 30 s), a killed one at once.
WORKER_TTL_SECONDS = 90
# A silent worker whose named Redis connection has been gone this long is dead (a live one
# reconnects at its next report, every REPORT_INTERVAL): its process is gone, and with it its
# broker connection, so the broker gave its messages back. It is forgotten at once rather than
# after WORKER_TTL_SECONDS, so a killed worker holds the risk window open seconds, not minutes.
GONE_MS = 2000
PROBE_TTL_SECONDS = 30

# A persist worker's report: ordered by SEQ_KEY, stamped with Redis's clock; returns
# the seq, `dedupe:since` and REISSUED_KEY for the worker's next threshold.
# KEYS: report, workers set, seq, since, reissued. ARGV: state JSON, TTL.
REPORT_SCRIPT = """
local seq = redis.call('INCR', KEYS[3])
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], seq .. ' ' .. ms .. ' ' .. ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
return {seq, redis.call('GET', KEYS[4]) or '', redis.call('GET', KEYS[5]) or ''}
"""
# A message from before the loss (timestamp before `dedupe:since` + skew) goes back to
# a queue: the threshold moves past now. KEYS: reissued, since. ARGV: oldest ts, now ms, skew.
REISSUE_SCRIPT = """
local since = redis.call('GET', KEYS[2])
if not since or tonumber(ARGV[1]) >= tonumber(since) + tonumber(ARGV[3]) then return 0 end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[2]) > last then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""
# A worker whose report expired (dead for WORKER_TTL_SECONDS): forgotten, and the
# threshold moves past now, since the broker gave its messages back to the queue.
# KEYS: workers set, reissued. ARGV: report key, now ms.
_FORGET_WORKER_SCRIPT = """
if redis.call('EXISTS', ARGV[1]) == 1 then return 0 end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) > last then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""


# A silent worker found dead: forgotten now, if its report is still the one found silent.
# KEYS: report, workers set, reissued. ARGV: the silent report's seq, now ms.
_BURY_WORKER_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if raw and string.sub(raw, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ' ' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[2]) > last then redis.call('SET', KEYS[3], ARGV[2]) end
return 1
"""


def worker_client_name(report_key: str) -> str:
    """The name of a persist worker's Redis connection (CLIENT SETNAME: no spaces)."""
    return report_key.replace(" ", "_")


def record_reissue(storage: Storage, oldest: int) -> None:
    """A message claimed at `oldest` was published again (a retry, a quarantine): the threshold
    moves past now if it is from before the loss. Call after the publish, before the ack."""
    storage.script(REISSUE_SCRIPT)(keys=[REISSUED_KEY, DEDUPE_SINCE_KEY],
                                   args=[oldest, int(time.time() * 1000), SKEW_MS])


# A gateway publishes a claim only while it knows, from a look at `dedupe:since` made at most
# this long before, that Redis still has the memory the claim was made in (MessageIntake).
KNOWN_FOR_MS = 500


def grace_ms() -> int:
    """How long after a loss a message claimed before it may still enter a persist queue: no
    gateway starts a publish of it later than KNOWN_FOR_MS after its last look at `dedupe:since`
    before the loss (MessageIntake, PersistPublisher), plus skew."""
    return KNOWN_FOR_MS + SKEW_MS


def threshold(since: int, reissued: int, grace: int) -> int:
    """T: a message claimed at or after T entered its queue after every message from before the
    loss did (and after the last time one of them went back to a queue)."""
    return max(since + grace, reissued + SKEW_MS)


@dataclass(frozen=True)
class WorkerReport:
    key: str
    seq: int
    at_ms: int  # Redis's clock
    prev: int  # the seq of this worker's report before this one (0: none)
    threshold: int | None
    held: int | None  # oldest message timestamp held unsettled
    passed: dict  # queue -> seq of the report that first saw a message claimed at or after threshold
    queues: tuple

    @classmethod
    def parse(cls, key: str, raw: str) -> "WorkerReport":
        seq, at_ms, body = raw.split(" ", 2)
        state = json.loads(body)
        passed = {q: (int(seq) if s == -1 else s) for q, s in (state.get("passed") or {}).items() if s is not None}
        prev = int(state.get("prev") or 0)
        prev = prev if prev < int(seq) else 0  # from before Redis lost SEQ_KEY: no evidence
        return cls(key, int(seq), int(at_ms), prev, state.get("t"), state.get("held"),
                   passed, tuple(state.get("queues") or ()))


def drain_verdict(reports: list[WorkerReport | None], since: int, reissued: int, grace: int, now_ms: int,
                  redis_ms: int, queues=PERSIST_QUEUES) -> str | None:
    """None when every message from before the loss at `since` is stored; else why not yet.

    `reports` are all persist workers' reports (None: a worker whose report expired);
    `now_ms` is this gateway's clock (for T), `redis_ms` Redis's (for the reports' age).
    """
    t = threshold(since, reissued, grace)
    if now_ms < t:
        return "publishes from before the loss may still be in flight"
    if not reports:
        return "no persist worker is reporting"
    for report in reports:
        if report is None:
            return "a persist worker stopped reporting (its messages go back to the queue)"
        if redis_ms - report.at_ms > STALE_MS:
            return f"persist worker {report.key} is silent"
        if report.threshold != t:
            return f"persist worker {report.key} does not track the threshold yet"
        if report.held is not None and report.held < since + SKEW_MS:
            return f"persist worker {report.key} holds a message from before the loss"
    for queue in queues:
        consumers = [r for r in reports if queue in r.queues]
        passes = [r.passed[queue] for r in consumers if queue in r.passed]
        if not passes:
            return f"nothing published after the loss has reached {queue} yet"
        # FIFO: whatever entered the queue before that message was delivered before it; a
        # report made after the one that saw it shows each worker's state from after that.
        first = min(passes)
        if any(r.prev < first and r.seq != first for r in consumers):
            return f"a worker on {queue} has not reported since the queue drained"
    return None


def id_floor(ms: int) -> int:
    """The smallest snowflake id made at `ms`."""
    return max(0, ms - EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS)


class RecoveryWatch:
    """A gateway's view of the risk window after the loss at `dedupe:since`.

    `open(since)` is cheap: the verdict is refreshed at most every REFRESH seconds
    (two Redis round trips) by one caller at a time, and once drained it stays so
    for that `since`. `probe(queue, ts)` publishes an empty persist task, so that a
    queue with no traffic drains too.
    """

    REFRESH = 0.05
    WATCH_EVERY = 0.2  # the background check, so that sends rarely find the window open for nothing

    def __init__(self, storage: Storage, grace: int, probe: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.storage = storage
        self.redis = storage.redis
        self.grace = grace
        self.probe = probe
        self.clock = clock
        self.dedupe_ttl_ms = storage.settings.dedupe_ttl_seconds * 1000
        self._lock = threading.Lock()
        self._drained: int | None = None  # the `since` known drained
        self._checked_at = 0.0
        self._checked_since: int | None = None
        self._nothing_to_rebuild: int | None = None
        self._gone_since: dict[str, float] = {}  # silent worker's report key -> when its connection was first missed
        self._known: tuple[int | None, float] = (None, float("-inf"))  # (`dedupe:since`, asked at: clock())
        self.reason: str | None = None
        self.gateway_id = storage.settings.gateway_id

    def start_watching(self, on_loss: Callable[[], None] | None = None) -> None:
        """Check the window in the background; `on_loss()` when Redis is seen to have lost its
        memory (the gateway puts its presence back at once)."""
        threading.Thread(target=self._watch, args=(on_loss,), daemon=True, name="dedupe-recovery").start()

    def _watch(self, on_loss) -> None:
        seen = None
        while True:
            time.sleep(self.WATCH_EVERY)
            try:
                since = self._ask_since()
                if on_loss is not None and seen is not None and since != seen:
                    on_loss()
            except Exception:
                continue  # Redis away: sends are refused meanwhile anyway
            seen = since
            if since is not None and self.clock() * 1000 - int(since) < self.dedupe_ttl_ms:
                self.open(int(since))

    def _ask_since(self):
        asked_at = self.clock()  # the answer shows Redis's memory at some moment after this
        since = self.redis.get(DEDUPE_SINCE_KEY)
        if asked_at >= self._known[1]:
            self._known = (int(since) if since is not None else None, asked_at)
        return since

    def known_since(self, expect: int | None = None) -> tuple[int | None, float]:
        """(`dedupe:since`, the clock() time at which Redis was known to have it), asking again when
        that is older than half of KNOWN_FOR_MS (the watch asks every WATCH_EVERY) or is not
        `expect` (a claim that saw a newer memory than the last look)."""
        known, at = self._known
        if (self.clock() - at) * 1000 > KNOWN_FOR_MS / 2 or (expect is not None and known != expect):
            self._ask_since()
        return self._known

    def drained_since(self) -> str:
        """The `since` this gateway knows drained, as the claim script compares it ("" if none)."""
        return str(self._drained) if self._drained is not None else ""

    def open(self, since: int) -> bool:
        """Is the loss at `since` still in its risk window?"""
        if self._drained == since:
            return False
        now = self.clock()
        if (self._checked_since == since and now - self._checked_at < self.REFRESH) or \
                not self._lock.acquire(blocking=False):
            return True
        try:
            self._checked_at, self._checked_since = now, since
            self.reason = self._verdict(since, int(now * 1000))
            if self.reason is None:
                self._drained = since
                self.redis.set(DRAINED_KEY.format(self.gateway_id), since, ex=self.dedupe_ttl_ms // 1000)
                log.info("dedupe: the persist pipeline drained past the Redis loss at %d (%.1f s after it)",
                         since, now - since / 1000)
                self._mark_nothing_to_rebuild(since)
                return False
            return True
        except Exception as exc:  # Redis or the broker away: stay in the window, which is always safe
            log.warning("dedupe: risk window check failed (%s)", exc.__class__.__name__)
            return True
        finally:
            self._lock.release()

    def _verdict(self, since: int, now_ms: int) -> str | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(WORKERS_KEY).get(REISSUED_KEY).time()
        members, reissued, (seconds, micros) = pipe.execute()
        reissued = int(reissued or 0)
        keys = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        raws = self.redis.mget(keys) if keys else []
        reports = []
        for key, raw in zip(keys, raws):
            if raw is None:
                self.storage.script(_FORGET_WORKER_SCRIPT)(keys=[WORKERS_KEY, REISSUED_KEY], args=[key, now_ms])
                reports.append(None)
            else:
                reports.append(WorkerReport.parse(key, raw.decode() if isinstance(raw, bytes) else raw))
        if self._bury_the_dead(reports, int(seconds) * 1000 + int(micros) // 1000, now_ms):
            reissued = max(reissued, now_ms)
        t = threshold(since, reissued, self.grace)
        if now_ms >= t and self.probe is not None and \
                self.redis.set(PROBED_KEY.format(t), now_ms, nx=True, ex=PROBE_TTL_SECONDS):
            try:
                for queue in PERSIST_QUEUES:
                    self.probe(queue, now_ms)
            except Exception:
                self.redis.delete(PROBED_KEY.format(t))  # another gateway, or the next check, probes
                raise
        return drain_verdict(reports, since, reissued, self.grace, now_ms, int(seconds) * 1000 + int(micros) // 1000)

    def _bury_the_dead(self, reports: list, redis_ms: int, now_ms: int) -> bool:
        """Forget the silent workers whose Redis connection has been gone GONE_MS; True if any.
        A hung worker (stopped, blocked) keeps its connection and holds the window open."""
        silent = [r for r in reports if r is not None and redis_ms - r.at_ms > STALE_MS]
        if not silent:
            self._gone_since.clear()
            return False
        connected = {c.get("name") for c in self.redis.client_list()}
        now, buried = self.clock(), False
        for report in silent:
            if worker_client_name(report.key) in connected:
                self._gone_since.pop(report.key, None)
                continue
            first = self._gone_since.setdefault(report.key, now)
            if (now - first) * 1000 >= GONE_MS and self.storage.script(_BURY_WORKER_SCRIPT)(
                    keys=[report.key, WORKERS_KEY, REISSUED_KEY], args=[report.seq, now_ms]):
                log.info("dedupe: persist worker %s is gone (no connection for %.1f s); forgotten", report.key,
                         now - first)
                self._gone_since.pop(report.key, None)
                buried = True
        return buried

    CHECK_AT_MOST = 1000

    def _mark_nothing_to_rebuild(self, since: int) -> None:
        """A database with no message from the dedupe window before the loss has nothing to rebuild.
        (Those of the first second after S whose records this Redis has were claimed after the loss.)"""
        with self.storage.engine.connect() as conn:
            older = conn.execute(select(Message.sender_id, Message.client_msg_id).where(
                Message.id >= id_floor(since - self.dedupe_ttl_ms),
                Message.id < id_floor(since + SKEW_MS)).limit(self.CHECK_AT_MOST)).all()
        if len(older) == self.CHECK_AT_MOST:
            return
        pipe = self.redis.pipeline(transaction=False)
        for row in older:
            pipe.exists(f"dedupe:{row.sender_id}:{row.client_msg_id}")
        if all(pipe.execute()):
            self.redis.set(RECOVERED_KEY, since, ex=self.dedupe_ttl_ms // 1000)
            log.info("dedupe: no message stored before the Redis loss at %d; nothing to rebuild", since)


def rebuild_sender(storage: Storage, sender_id: int, since: int) -> int:
    """The dedupe records of a sender's messages from before the loss, from MySQL back into Redis,
    then the sender's marker. Returns how many.

    They go into one hash per sender (`dedupe:old:{uid}`, one HSET for the whole day, expiring
    when the newest could): the claim script reads it only when the send's own record is
    missing, so a record made since the loss always wins."""
    ttl = storage.settings.dedupe_ttl_seconds
    with storage.engine.connect() as conn:  # idx_sender (sender_id, timestamp)
        rows = conn.execute(select(Message.client_msg_id, Message.id, Message.conversation_id, Message.timestamp)
                            .where(Message.sender_id == sender_id, Message.timestamp >= since - ttl * 1000,
                                   Message.timestamp < since + SKEW_MS,  # claimed before the loss
                                   Message.client_msg_id.is_not(None))).all()
    pipe = storage.redis.pipeline(transaction=True)
    key = OLD_RECORDS_KEY.format(sender_id)
    pipe.delete(key)
    if rows:
        # The ack JSON of intake.Ack.to_json, made by hand: this runs for every row of the sender's day.
        pipe.hset(key, mapping={cmid: f'{{"m": "{msg_id}", "c": {json.dumps(conv)}, "t": {ts}}}'
                                for cmid, msg_id, conv, ts in rows})
        pipe.expireat(key, (since + SKEW_MS) // 1000 + ttl)
    pipe.set(REBUILT_KEY.format(sender_id), since, ex=ttl)
    pipe.execute()
    log.info("dedupe: rebuilt %d records of user %d after the Redis loss at %d", len(rows), sender_id, since)
    return len(rows)


class StoredAcks:
    """Sends that wait until they are stored: one query per tick for all of them.

    `wait(sender_id, client_msg_id, timeout)` returns (msg_id, conversation_id, timestamp)
    of the stored copy, whichever copy persist kept, or None after `timeout`.
    """

    TICK = 0.01
    CHUNK = 500

    def __init__(self, storage: Storage):
        self.storage = storage
        self._cond = threading.Condition(threading.Lock())
        self._waiting: dict[tuple[int, str], list] = {}  # key -> [event, result]
        self._thread: threading.Thread | None = None

    def wait(self, sender_id: int, client_msg_id: str, timeout: float):
        slot = [threading.Event(), None]
        with self._cond:
            self._waiting.setdefault((sender_id, client_msg_id), []).append(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="stored-acks")
                self._thread.start()
            self._cond.notify()
        if not slot[0].wait(timeout):
            with self._cond:
                slots = self._waiting.get((sender_id, client_msg_id), [])
                if slot in slots:
                    slots.remove(slot)
                    if not slots:
                        del self._waiting[(sender_id, client_msg_id)]
        return slot[1]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                keys = list(self._waiting)
            try:
                found = self._lookup(keys)
            except Exception as exc:  # the database away: the waiters time out and get the error
                log.warning("stored-ack lookup of %d sends failed (%s)", len(keys), exc.__class__.__name__)
                found = {}
            with self._cond:
                for key, result in found.items():
                    for slot in self._waiting.pop(key, []):
                        slot[1] = result
                        slot[0].set()
            time.sleep(self.TICK)

    def _lookup(self, keys: list[tuple[int, str]]) -> dict:
        found = {}
        with self.storage.engine.connect() as conn:
            for start in range(0, len(keys), self.CHUNK):
                rows = conn.execute(select(Message.sender_id, Message.client_msg_id, Message.id,
                                           Message.conversation_id, Message.timestamp).where(
                    tuple_(Message.sender_id, Message.client_msg_id).in_(keys[start:start + self.CHUNK])))
                for row in rows:
                    found[(row.sender_id, row.client_msg_id)] = (row.id, row.conversation_id, row.timestamp)
        return found
