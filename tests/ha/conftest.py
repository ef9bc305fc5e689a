"""The production shape of DESIGN §9 on this machine: scripts/cluster.py starts a
3-node RabbitMQ cluster (quorum queues), Redis with 3 sentinels and a MariaDB
primary with a GTID replica for the session, and brings it down afterwards.
None of the machine's own services is touched."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from app.config import Settings
from celeryconfig import worker_queues
from scripts import cluster
from tests.faults.test_faults import FaultCluster
from tests.harness import ROOT, Gateway, Services, Worker, wait_until

BINARIES = ("redis-server", "redis-cli", "mariadbd", "mariadb-install-db", "mariadb")


class ClusterServices(Services):
    """Services whose processes also get the cluster's variables (Sentinel, quorum, replica)."""

    def __init__(self, env: cluster.Env):
        super().__init__("real", env.database_url, env.broker_url, env.redis_url)
        self.cluster_env = env

    def env(self, **extra) -> dict[str, str]:
        return super().env(**{k: v for k, v in self.cluster_env.as_dict().items()
                              if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL")}, **extra)


def rotated_broker_url(services: ClusterServices, first: int) -> str:
    """BROKER_URL starting at node `first`: the two gateways hold connections to different nodes."""
    urls = services.broker_url.split(";")
    return ";".join(urls[first:] + urls[:first])


class HaCluster(FaultCluster):
    """The fault suite's two gateways and three workers, on the cluster. Workers that die
    are replaced as in the fault suite, but counted: on a cluster none may die."""

    def __init__(self, services: ClusterServices, log_dir):
        self.services, self.log_dir = services, log_dir
        self.queues = worker_queues(Settings.from_env(services.env()))
        self.workers_replaced = 0
        self.gateways = [self._gateway(i) for i in range(2)]
        self.persist = self.dispatch = self.push = None
        self.ensure_workers()
        self.workers_replaced = 0

    def _gateway(self, i: int) -> Gateway:
        return Gateway(f"hgw{i + 1}", self.services, self.log_dir, BROKER_URL=rotated_broker_url(self.services, i))

    def ensure_workers(self) -> None:
        for name, queues in self.queues.items():
            worker = getattr(self, name)
            if worker is None or not worker.alive():
                if worker is not None:
                    worker.stop()
                    self.workers_replaced += 1
                setattr(self, name, Worker(f"h{name}", queues, self.services, self.log_dir,
                                           concurrency=1 if name == "push" else 2))

    def publish_pushes(self, name: str, pushes: list[tuple[int, int]], countdown: float | None = None) -> None:
        """Queue push tasks (push id, priority) as the cluster's processes do, from a process
        with the cluster's settings (this one's Celery app may be bound to other services)."""
        code = ("import json, sys; from tasks.publish import queue_push_task\n"
                "for push_id, priority in json.loads(sys.argv[2]):\n"
                "    queue_push_task(sys.argv[1], [push_id], priority, countdown=json.loads(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, name, json.dumps(pushes), json.dumps(countdown)],
                       env=self.services.env(), cwd=ROOT, check=True, capture_output=True, timeout=60)

    def assert_workers_survived(self) -> None:
        """No worker exited during the fault (each would have been replaced, or still be dead)."""
        dead = [w.node for w in (self.persist, self.dispatch, self.push) if not w.alive()]
        assert self.workers_replaced == 0 and not dead, \
            f"workers exited: {self.workers_replaced} replaced, dead now: {dead}"

    def ensure_gateways(self) -> None:
        for i, gateway in enumerate(self.gateways):
            if not gateway.alive():
                gateway.stop()
                self.gateways[i] = self._gateway(i)


@pytest.fixture(scope="session")
def ha_env():
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing or not (cluster.RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"the cluster needs rabbitmq-server, redis-server and mariadb installed (missing: {missing})")
    env = cluster.up()
    try:
        from app.storage import upgrade_schema

        upgrade_schema(env.database_url)
        yield env
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def ha_services(ha_env):
    return ClusterServices(ha_env)


@pytest.fixture(scope="session")
def ha_storage(ha_env):
    from app.config import Settings
    from app.storage import Storage

    s = Storage(Settings.from_env(ha_env.as_dict()))
    yield s
    s.dispose()


@pytest.fixture(scope="session")
def ha(ha_services, log_dir):
    c = HaCluster(ha_services, log_dir)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def cluster_restored(ha_env):
    """Every node killed by a test is started again (a killed Redis primary comes back as a
    replica of the new one), so each test begins with the whole cluster."""
    yield
    for i in range(len(cluster.RABBIT_NODES)):
        if not cluster.rabbit_running(i):
            cluster.start_rabbit(i)
    for i in range(len(cluster.RABBIT_NODES)):
        cluster.await_rabbit(i)
    primary = cluster.redis_primary_port()
    for i in range(len(cluster.REDIS_PORTS)):
        if cluster.pid_of(f"redis-{cluster.REDIS_PORTS[i]}") is None:
            cluster.start_redis(i, replica_of=cluster.redis_index(primary))
    cluster.start_replication()
    wait_until(cluster.replica_caught_up, timeout=60, interval=0.2, what="the MariaDB replica to catch up")
