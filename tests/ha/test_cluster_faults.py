"""Faults of a clustered production (DESIGN §9), with the fault suite's verdict: under
a steady send load across two gateways, every acked message is stored once and is in
its recipient's stream once, no send goes unanswered, and sends resume. Each fault
appends its report line to test-artifacts/faults/report.jsonl, like tests/faults.

- kill -9 the RabbitMQ node leading the chat queues: the quorum queues elect leaders
  on the two others; no worker may exit (on classic queues every worker did, with
  NOT_FOUND home node … is down);
- kill -9 the Redis primary: Sentinel promotes a replica; the report's
  acks_back_after_s is the time without successful sends.
"""
from __future__ import annotations

from scripts import cluster
from tests.faults.test_faults import assert_nothing_lost, run_with_fault


def queue_leader(queue: str) -> int:
    """Index of the RabbitMQ node leading a quorum queue."""
    alive = next(i for i in range(len(cluster.RABBIT_NODES)) if cluster.rabbit_running(i))
    out = cluster.rabbitmqctl(alive, "list_queues", "name", "leader", "--no-table-headers", "--quiet").stdout
    leaders = dict(line.split("\t")[:2] for line in out.strip().splitlines() if line.count("\t") >= 1)
    return [cluster.rabbit_node(i) for i in range(len(cluster.RABBIT_NODES))].index(leaders[queue])


def test_rabbitmq_node_leading_the_queues_killed_under_load(ha, ha_storage):
    killed = []

    def kill_leader():
        killed.append(queue_leader("private_messages"))
        cluster.kill_rabbit(killed[0])

    report = run_with_fault("ha-kill-rabbitmq-leader", ha, ha_storage, kill_leader)
    assert_nothing_lost(report)
    ha.assert_workers_survived()
    assert queue_leader("private_messages") != killed[0]


def test_redis_primary_killed_sentinel_promotes_a_replica(ha, ha_storage):
    before = cluster.redis_primary_port()
    report = run_with_fault("ha-kill-redis-primary", ha, ha_storage,
                            lambda: cluster.kill_redis(cluster.redis_index(before)))
    assert_nothing_lost(report)
    assert cluster.redis_primary_port() not in (None, before)
    ha.assert_workers_survived()
