"""Faults of a clustered production (DESIGN §9), with the fault suite's verdict: under
a steady send load across two gateways, every acked message is stored once and is in
its recipient's stream once, no send goes unanswered, and sends resume. Each fault
appends its report line to test-artifacts/faults/report.jsonl, like tests/faults.

- kill -9 the RabbitMQ node leading the chat queues: the quorum queues elect leaders
  on the two others; no worker may exit (on classic queues every worker did, with
  NOT_FOUND home node … is down);
- kill -9 the node the second gateway is connected to (its publishes move to
  another node);
- kill -9 the Redis primary: Sentinel promotes a replica; the report's
  acks_back_after_s is the time without successful sends;
- one gateway cut off from every broker node (a TCP proxy that resets its
  connections and refuses new ones) for DOWN_SECONDS, then healed: its senders
  get retryable error frames, never a false ack, and resend.
"""
from __future__ import annotations

import time

from scripts import cluster
from tests.faults.test_faults import DOWN_SECONDS, assert_nothing_lost, run_with_fault
from tests.ha.proxy import TcpProxy
from tests.harness import Gateway


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


def test_rabbitmq_node_a_gateway_is_connected_to_killed_under_load(ha, ha_storage):
    # The second gateway's BROKER_URL starts at the second node (conftest.rotated_broker_url).
    report = run_with_fault("ha-kill-rabbitmq-gateway-node", ha, ha_storage, lambda: cluster.kill_rabbit(1))
    assert_nothing_lost(report)
    ha.assert_workers_survived()


def test_redis_primary_killed_sentinel_promotes_a_replica(ha, ha_storage):
    before = cluster.redis_primary_port()
    report = run_with_fault("ha-kill-redis-primary", ha, ha_storage,
                            lambda: cluster.kill_redis(cluster.redis_index(before)))
    assert_nothing_lost(report)
    assert cluster.redis_primary_port() not in (None, before)
    ha.assert_workers_survived()


def test_a_gateway_cut_off_from_the_broker_and_healed(ha, ha_storage):
    proxies = [TcpProxy(port) for port in cluster.RABBIT_PORTS]
    cut_off = Gateway("hgw2-proxied", ha.services, ha.log_dir,
                      BROKER_URL=";".join(f"amqp://guest:guest@127.0.0.1:{p.port}//" for p in proxies))
    normal, ha.gateways[1] = ha.gateways[1], cut_off
    try:
        def cut_and_heal():
            for proxy in proxies:
                proxy.cut()
            time.sleep(DOWN_SECONDS)  # its senders get retryable errors meanwhile, and retry
            for proxy in proxies:
                proxy.heal()

        report = run_with_fault("ha-gateway-cut-off-from-broker", ha, ha_storage, cut_and_heal)
        assert_nothing_lost(report)
        assert report["error_frames"], "the cut-off gateway answered sends it could not publish with acks"
        ha.assert_workers_survived()
    finally:
        ha.gateways[1] = normal
        cut_off.stop()
        for proxy in proxies:
            proxy.cut()
