"""Group commit: concurrent callers share one round trip (the gateway's intake uses it for Redis and the broker).

Every accepted send must be confirmed by RabbitMQ before it is acked, and
claims its dedupe record in Redis before that. One round trip per message
for each costs a syscall pair, a Celery task message and a confirm; here the
sends that arrive while earlier calls are in flight go together: their
dedupe claims as one Redis pipeline, their payloads as one persist_message
task with one confirm. At low load a batch is one message and nothing waits
longer than before; under load batches grow by themselves, and persist
stores each batch in one transaction.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Generic, TypeVar

from app.errors import ChatError, Unavailable

log = logging.getLogger(__name__)

Item, Result = TypeVar("Item"), TypeVar("Result")


class _Waiter:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item):
        self.item = item
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """`group_commit(item)` returns `call_many(items)[i]` for its item, made together with the
    items of other greenlets that were waiting meanwhile; an exception of the call is
    raised to each of them.

    `in_flight` calls may run at the same time (a window), each with at most
    `max_batch` items. `timeout` is a backstop: call_many has its own timeouts.
    """

    def __init__(self, name: str, call_many: Callable[[list], list], timeout: float, max_batch: int = 200,
                 in_flight: int = 1):
        self.name = name
        self.call_many = call_many
        self.timeout = timeout
        self.max_batch = max_batch
        self._pending: list[_Waiter] = []
        self._wake = threading.Condition(threading.Lock())
        for number in range(in_flight):
            threading.Thread(target=self._run, daemon=True, name=f"{name}-{number}").start()

    def __call__(self, item: Item) -> Result:
        waiter = _Waiter(item)
        with self._wake:
            self._pending.append(waiter)
            self._wake.notify()
        if not waiter.done.wait(self.timeout):
            raise Unavailable(f"message not accepted: {self.name} did not answer in time; "
                              "retry with the same client_msg_id")
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _take(self) -> list[_Waiter]:
        with self._wake:
            while not self._pending:
                self._wake.wait()
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                results = self.call_many([w.item for w in batch])
            except Exception as exc:
                if not isinstance(exc, ChatError):
                    log.warning("%s: a batch of %d failed (%s)", self.name, len(batch), exc.__class__.__name__)
                for waiter in batch:
                    waiter.error = exc
                    waiter.done.set()
                continue
            for waiter, result in zip(batch, results):
                waiter.result = result
                waiter.done.set()
