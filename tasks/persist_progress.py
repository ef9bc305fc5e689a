"""A persist worker's report of what it holds, for the gateways' risk window (app/chat/recovery.py).

The worker's main process (the batching strategy, tasks/batching.py) tells the
tracker every persist_message task message it receives, settles, gives back or
loses; every REPORT_INTERVAL it writes to Redis the oldest message timestamp it
holds unsettled and, per persist queue, the report in which it first received a
message claimed at or after the current threshold. Writing the report is one
short script on the worker's main loop, with a 1 s socket timeout.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from app.chat import recovery
from app.config import Settings
from app.storage import make_redis

log = logging.getLogger(__name__)

_QUEUE_OF_ROUTE = {"private.message": "private_messages", "group.message": "group_messages"}


def message_times(args: list, kwargs: dict) -> tuple[int | None, int | None]:
    """(oldest, newest) claim timestamp of a persist_message task message; a probe counts as its time."""
    messages = args[0] if args else kwargs.get("messages")
    payloads = [messages] if isinstance(messages, dict) else list(messages or [])
    times = [int(p["timestamp"]) for p in payloads if isinstance(p, dict) and p.get("timestamp") is not None]
    if kwargs.get("probe") is not None:
        times.append(int(kwargs["probe"]))
    return (min(times), max(times)) if times else (None, None)


class PersistProgress:
    def __init__(self, settings: Settings, grace: int, queues: list[str]):
        self.key = recovery.WORKER_KEY.format(f"{socket.gethostname()}:{os.getpid()}")
        # Through Sentinel like every client; its connection carries the report's name, so that
        # the gateways can tell a dead worker (no connection left) from a slow one (app.chat.recovery).
        self.redis = make_redis(settings, client_name=recovery.worker_client_name(self.key), socket_timeout=1,
                                socket_connect_timeout=1, max_connections=4)
        self.report_script = self.redis.register_script(recovery.REPORT_SCRIPT)
        self.reissue_script = self.redis.register_script(recovery.REISSUE_SCRIPT)
        self.grace = grace
        self.queues = [q for q in queues if q in recovery.PERSIST_QUEUES]
        self.held: dict[str, int | None] = {}  # task message id -> its oldest claim timestamp
        self.threshold: int | None = None
        self.seen: dict[str, bool] = {}  # queue -> received a message claimed at or after threshold
        self.passed: dict[str, int] = {}  # queue -> seq of the report that first said so
        self.prev = 0
        self.unrecorded: int | None = None  # oldest timestamp of a reissue Redis has not recorded

    def restart(self) -> None:
        """The consumer restarted (lost its broker connection): the broker gave back every message
        the old one held, unseen by the reports. Forget them and move the threshold past now."""
        held = [ts for ts in self.held.values() if ts is not None]
        self.held.clear()
        if held:
            self.reissued(min(held))

    def received(self, request_id: str, routing_key: str | None, args: list, kwargs: dict) -> None:
        oldest, newest = message_times(args, kwargs)
        self.held[request_id] = oldest
        queue = _QUEUE_OF_ROUTE.get(routing_key or "", "private_messages")
        if self.threshold is not None and newest is not None and newest >= self.threshold:
            self.seen[queue] = True

    def settled(self, request_id: str) -> None:
        self.held.pop(request_id, None)

    def given_back(self, request_id: str) -> None:
        """A message requeued (given back, or its pool process lost): before the broker has it again."""
        ts = self.held.pop(request_id, None)
        if ts is not None:
            self.reissued(ts)

    def reissued(self, oldest: int) -> None:
        """A message claimed at `oldest` goes back to a queue: recorded before it does. If Redis does
        not answer, this worker reports nothing until it does, so the gateways see it silent."""
        self.unrecorded = oldest if self.unrecorded is None else min(self.unrecorded, oldest)
        self._record_reissue()

    def _record_reissue(self) -> bool:
        if self.unrecorded is None:
            return True
        try:
            self.reissue_script(keys=[recovery.REISSUED_KEY, recovery.DEDUPE_SINCE_KEY],
                                args=[self.unrecorded, int(time.time() * 1000), recovery.SKEW_MS])
        except Exception as exc:
            log.warning("persist progress: a reissue not recorded yet (%s)", exc.__class__.__name__)
            return False
        self.unrecorded = None
        return True

    def report(self) -> None:
        if not self._record_reissue():
            return
        held = [ts for ts in self.held.values() if ts is not None]
        state = {"prev": self.prev, "t": self.threshold, "held": min(held) if held else None,
                 "queues": self.queues,
                 "passed": {q: self.passed.get(q, -1 if self.seen.get(q) else None) for q in self.queues}}
        try:
            seq, since, reissued = self.report_script(
                keys=[self.key, recovery.WORKERS_KEY, recovery.SEQ_KEY, recovery.DEDUPE_SINCE_KEY, recovery.REISSUED_KEY],
                args=[json.dumps(state), recovery.WORKER_TTL_SECONDS])
        except Exception as exc:
            log.warning("persist progress: report failed (%s)", exc.__class__.__name__)
            return
        for queue, value in state["passed"].items():
            if value == -1:
                self.passed[queue] = int(seq)
        self.prev = int(seq)
        threshold = recovery.threshold(int(since), int(reissued or 0), self.grace) if since else None
        if threshold != self.threshold:  # a new loss or a reissue: prove the drain again
            self.threshold, self.seen, self.passed = threshold, {}, {}
