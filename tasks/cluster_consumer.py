"""The worker's consumer on a RabbitMQ cluster (RABBITMQ_QUEUE_TYPE=quorum).

Celery's DelayedDelivery step declares its delayed queues and bindings on every
URL of BROKER_URL in turn, each with retries (1 + 3 + 5 s), before the consumer
consumes again. The nodes of a cluster share one set of queues and bindings, so
with a node down a reconnecting worker would sit idle for about 17 s, trying the
dead node. Here the setup is done once, on the first node that answers.
"""
from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.utils.url import maybe_sanitize_url

log = logging.getLogger(__name__)


class ClusterDelayedDelivery(DelayedDelivery):
    """Native delayed delivery set up on one node of the cluster: the first that answers."""

    def start(self, c) -> None:
        self._validate_configuration(c.app)
        urls = self._validate_broker_urls(c.app.conf.broker_url)
        current = c.connection.as_uri(include_password=True) if c.connection else None
        # The node the consumer is connected to first: it just answered.
        for url in sorted(urls, key=lambda u: u != current):
            try:
                self._setup_delayed_delivery(c, url)
                return
            except Exception as exc:
                log.warning("delayed delivery setup on %s failed (%s); trying the next node",
                            maybe_sanitize_url(url), exc.__class__.__name__)
        log.critical("delayed delivery could not be set up on any node: countdown tasks wait in the worker")

    def _bind_queues(self, app, connection) -> None:
        # A queue's exchange must exist to be bound, and a worker declares only the
        # queues it consumes: declare them all (idempotent) first.
        with connection.channel() as channel:
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
        super()._bind_queues(app, connection)


class ClusterConsumer(Consumer):
    class Blueprint(Consumer.Blueprint):
        default_steps = [f"{__name__}:ClusterDelayedDelivery" if step.endswith(":DelayedDelivery") else step
                         for step in Consumer.Blueprint.default_steps]
