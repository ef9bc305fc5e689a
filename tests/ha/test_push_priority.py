"""Push priorities on quorum queues, which have none: a private push queued behind a
backlog of digest-priority pushes still goes out first (or second, behind the one
digest the worker had already taken), because it waits in push_tasks.high, not
behind them (celeryconfig.PUSH_CLASSES)."""
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
