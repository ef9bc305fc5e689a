"""Group commit for the gateway's publishes to the broker.

Every accepted send must be confirmed by RabbitMQ before it is acked. One
confirmed publish per message costs a broker round trip and a Celery task
each; here the sends that arrive while earlier publishes are in flight leave
together, as one persist_message task with one confirm. At low load a batch
is one message and nothing waits longer than before; under load batches grow
by themselves, and persist stores each batch in one transaction.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from app.errors import Unavailable

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("payload", "done", "error")

    def __init__(self, payload: dict):
        self.payload = payload
        self.done = threading.Event()
        self.error: BaseException | None = None


class BatchPublisher:
    """`publish(payload)` returns once the broker confirmed the batch holding it, or raises.

    `publish_many(payloads)` publishes one batch, all private or all group
    messages, and returns once confirmed; `after_publish(payloads)` then runs
    before the senders are woken. `in_flight` batches may await their
    confirms at the same time (a window), each at most `max_batch`.
    """

    def __init__(self, publish_many: Callable[[list[dict]], None], timeout: float, max_batch: int = 200,
                 in_flight: int = 1, after_publish: Callable[[list[dict]], None] = lambda payloads: None):
        self.publish_many = publish_many
        self.after_publish = after_publish
        self.timeout = timeout
        self.max_batch = max_batch
        self._pending: list[_Waiter] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        for number in range(in_flight):
            threading.Thread(target=self._run, daemon=True, name=f"publisher-{number}").start()

    def publish(self, payload: dict) -> None:
        waiter = _Waiter(payload)
        with self._wake:
            self._pending.append(waiter)
            self._wake.notify()
        # publish_many gives up after `timeout` (and a few quick retries); this is a backstop.
        if not waiter.done.wait(self.timeout * 4 + 5):
            raise Unavailable("message not accepted: the message broker did not confirm in time; "
                              "retry with the same client_msg_id")
        if waiter.error is not None:
            raise waiter.error

    def _take(self) -> list[_Waiter]:
        with self._wake:
            while not self._pending:
                self._wake.wait()
            # One route per task: the oldest message's, and whatever else is waiting on it.
            group = self._pending[0].payload.get("group_id") is not None
            batch = [w for w in self._pending if (w.payload.get("group_id") is not None) == group][:self.max_batch]
            taken = set(map(id, batch))
            self._pending = [w for w in self._pending if id(w) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            payloads = [w.payload for w in batch]
            try:
                self.publish_many(payloads)
            except Unavailable as exc:
                error: BaseException | None = exc
            except Exception:  # never leave a sender waiting on a surprise
                log.exception("publish of %d messages failed", len(batch))
                error = Unavailable("message not accepted: publishing failed; retry with the same client_msg_id")
            else:
                error = None
                try:
                    self.after_publish(payloads)
                except Exception:  # published all the same: the senders get their acks
                    log.exception("after publishing %d messages", len(batch))
            for waiter in batch:
                waiter.error = error
                waiter.done.set()
