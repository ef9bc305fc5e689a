"""Throughput on the cluster against the single nodes, in the same run: senders that
send as fast as their acks come (one message in flight each, like the fault
suite's clients) over two gateways, for a fixed window, on the cluster (quorum
queues on 3 nodes, Redis through Sentinel) and on the machine's single RabbitMQ,
Redis and MariaDB (the shared gateways of tests/conftest.py). Every send must be
acked; the rates go to test-artifacts/faults/report.jsonl."""
from __future__ import annotations

import json
import time

from tests.faults.load import Sender
from tests.faults.test_faults import REPORT
from tests.harness import register_and_login, wait_until

SENDERS, WARMUP_SECONDS, WINDOW_SECONDS = 6, 3.0, 10.0


def acks_per_second(gateways, name: str) -> dict:
    users = [register_and_login(gateways[0].http) for _ in range(2 * SENDERS)]
    senders = [Sender(users[i], users[i + SENDERS].user_id, gateways, f"{name}-{i}", 0.0, first_gateway=i).start()
               for i in range(SENDERS)]
    try:
        wait_until(lambda: all(s.stats.acked for s in senders), timeout=60, what="every sender acked")
        time.sleep(WARMUP_SECONDS)
        before = sum(len(s.stats.acked) for s in senders)
        time.sleep(WINDOW_SECONDS)
        acked = sum(len(s.stats.acked) for s in senders) - before
    finally:
        for sender in senders:
            sender.finish()
    errors = sum(sum(s.stats.errors.values()) + s.stats.silences for s in senders)
    return {"acks_per_s": round(acked / WINDOW_SECONDS, 1), "errors": errors}


def test_throughput_on_the_cluster_and_on_single_nodes(ha, ha_storage, cluster):
    # As in the fault suite: a Redis that has remembered sends for days, so the cluster's
    # gateways are not in dedupe recovery (the shared single-node ones never are).
    ha_storage.redis.set("dedupe:since", int((time.time() - 3 * 86400) * 1000))
    on_cluster = acks_per_second(ha.gateways, "tp-cluster")
    single = acks_per_second([cluster.gw1, cluster.gw2], "tp-single")
    report = {"check": "ha-throughput", "senders": SENDERS, "window_s": WINDOW_SECONDS,
              "cluster_acks_per_s": on_cluster["acks_per_s"], "single_node_acks_per_s": single["acks_per_s"],
              "cluster_vs_single": round(on_cluster["acks_per_s"] / max(single["acks_per_s"], 0.1), 2)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(json.dumps(report) + "\n")
    print(json.dumps(report))
    assert on_cluster["errors"] == 0 and single["errors"] == 0, (on_cluster, single)
    assert on_cluster["acks_per_s"] > 0 and single["acks_per_s"] > 0
