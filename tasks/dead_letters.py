"""Dead-lettered tasks: count them and send them back where they came from."""
from __future__ import annotations

from typing import Callable

from celery.signals import worker_ready
from kombu import Producer

from tasks import app
from tasks.runtime import settings


def dead_letter_count() -> int:
    with app.connection_for_write() as conn:
        queue = app.conf.dead_letter_queue(conn.default_channel)
        queue.declare()
        return queue.queue_declare(passive=True).message_count


def replay_dead_letters(limit: int, progress: Callable[[int], None] = lambda n: None) -> int:
    """Republish up to `limit` dead letters to their original exchange and routing key."""
    replayed = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        queue = app.conf.dead_letter_queue(channel)
        queue.declare()
        # What fails again comes back behind these: replay each letter at most once per run.
        limit = min(limit, queue.queue_declare(passive=True).message_count)
        producer = Producer(channel)
        while replayed < limit:
            message = queue.get(no_ack=False)
            if message is None:
                break
            death = (message.headers.get("x-death") or [{}])[0]
            producer.publish(message.body, exchange=death.get("exchange", ""),
                             routing_key=(death.get("routing-keys") or [""])[0],
                             headers={k: v for k, v in message.headers.items() if k != "x-death"},
                             content_type=message.content_type, content_encoding=message.content_encoding,
                             delivery_mode=2, priority=message.properties.get("priority") or 0)
            message.ack()
            replayed += 1
            if replayed % 1000 == 0:
                progress(replayed)
    return replayed


@worker_ready.connect
def _declare_dead_letter_queue(sender=None, **_):
    """The dead-letter exchange must exist before a task is rejected, or RabbitMQ drops it."""
    if settings().broker_is_amqp:
        with app.connection_for_write() as conn:
            app.conf.dead_letter_queue(conn.default_channel).declare()
