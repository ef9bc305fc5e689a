"""Push priorities and countdowns on quorum queues, which have neither priorities nor
a worker-held ETA: a private push queued behind a backlog of digest-priority pushes
still goes out first (or second, behind the one digest the worker had already
taken), because it waits in push_tasks.high, not behind them
(celeryconfig.PUSH_CLASSES); a push retried with a countdown waits in the broker
(native delayed delivery), not in a worker, and reaches its queue when due."""
from __future__ import annotations

import json
import time

from tests.harness import Worker, register_and_login, wait_until
from tests.test_push import add_device, apns_for, digest_backlog_then_a_private_push


def test_a_private_push_overtakes_a_digest_backlog_on_quorum_queues(ha, ha_storage, push_fakes, log_dir):
    from tasks.publish import DELIVER_PUSH

    people = [register_and_login(ha.gateways[0].http) for _ in range(13)]
    tokens = [add_device(ha_storage, u, "ios") for u in people]
    ha.push.stop()  # nothing consumes the push queues while the backlog builds
    worker = None
    try:
        ha.publish_pushes(DELIVER_PUSH, digest_backlog_then_a_private_push(ha_storage, people, tokens))
        worker = Worker("hpush-fakes", ha.queues["push"], ha.services, log_dir, concurrency=1, **push_fakes.env)
        started = time.monotonic()
        wait_until(lambda: apns_for(push_fakes, tokens[-1]), timeout=30, what="the private push")
        private_after = time.monotonic() - started
        wait_until(lambda: all(apns_for(push_fakes, t) for t in tokens), timeout=60, what="all 13 pushes")
    finally:
        if worker is not None:
            worker.stop()
        ha.ensure_workers()
        ha.workers_replaced = 0  # stopped on purpose
    order = [r.token for r in push_fakes.apns.notifications if r.token in tokens]
    print(json.dumps({"check": "ha-private-push-behind-digest-backlog", "backlog": len(tokens) - 1,
                      "private_push_position": order.index(tokens[-1]),
                      "private_push_after_s": round(private_after, 2)}))
    assert order.index(tokens[-1]) <= 1


def test_a_countdown_push_waits_in_the_broker_until_due(ha, ha_storage, push_fakes, log_dir):
    from tasks.publish import DELIVER_PUSH

    people = [register_and_login(ha.gateways[0].http) for _ in range(2)]
    tokens = [add_device(ha_storage, u, "ios") for u in people]
    (delayed, _), (prompt, _) = digest_backlog_then_a_private_push(ha_storage, people, tokens)
    ha.push.stop()  # no consumer: what the queues hold is what the broker holds
    worker = None
    try:
        published = time.monotonic()
        ha.publish_pushes(DELIVER_PUSH, [(delayed, 1)], countdown=4)  # as a retry backing off would be
        ha.publish_pushes(DELIVER_PUSH, [(prompt, 8)])
        assert ready_messages(ha, "push_tasks.high") == 1
        assert ready_messages(ha, "push_tasks.low") == 0, "the countdown task was not held back by the broker"
        wait_until(lambda: ready_messages(ha, "push_tasks.low") == 1, timeout=20, interval=0.1,
                   what="the delayed push forwarded to its queue")
        forwarded_after = time.monotonic() - published
        worker = Worker("hpush-fakes", ha.queues["push"], ha.services, log_dir, concurrency=1, **push_fakes.env)
        wait_until(lambda: all(apns_for(push_fakes, t) for t in tokens), timeout=30, what="both pushes")
    finally:
        if worker is not None:
            worker.stop()
        ha.ensure_workers()
        ha.workers_replaced = 0  # stopped on purpose
    print(json.dumps({"check": "ha-countdown-on-quorum", "countdown_s": 4,
                      "forwarded_to_its_queue_after_s": round(forwarded_after, 1)}))
    assert 3.5 <= forwarded_after < 10


def ready_messages(ha, queue: str) -> int:
    """Messages waiting in a queue, as RabbitMQ counts them when the queue is declared."""
    from kombu import Connection

    with Connection(ha.services.broker_url) as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
