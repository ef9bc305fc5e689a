"""Fixtures: one isolated set of services per run, real gateways and workers.

NETHERLINK_TEST_SERVICES=real|embedded|auto (default auto: real when
RabbitMQ, MariaDB/MySQL and Redis answer on 127.0.0.1). With
NETHERLINK_REQUIRE_SERVICES=1 (CI) a run without the real services, or with
any skipped test, fails.
"""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from tests.harness import (
    ROOT, ChatClient, Gateway, Services, Worker, provision_embedded, provision_real, real_services_reachable,
    register_and_login, wait_out_of_risk_window,
)

RUN_ID = uuid.uuid4().hex[:10]
REQUIRE_SERVICES = os.environ.get("NETHERLINK_REQUIRE_SERVICES") == "1"


def pytest_collection_modifyitems(session, config, items):
    # The fault suite restarts RabbitMQ, Redis and MariaDB: it runs last, after
    # every test that relies on the shared gateways and workers, followed only by
    # the cluster suite (tests/ha, its own engines on ports of their own). The fast
    # domain tests (tests/unit) run first: a broken rule fails the run in seconds.
    items.sort(key=lambda item: ("/tests/ha/" in str(item.path), "/tests/faults/" in str(item.path),
                                 "/tests/unit/" not in str(item.path)))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_services: needs RabbitMQ and MySQL (skipped on embedded defaults)")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if REQUIRE_SERVICES and skipped:
        reporter.write_line(f"NETHERLINK_REQUIRE_SERVICES=1 but {skipped} test(s) were skipped: failing the run",
                            red=True)
        session.exitstatus = 1


def _choose_kind() -> str:
    wanted = os.environ.get("NETHERLINK_TEST_SERVICES", "auto")
    if wanted == "auto":
        wanted = "real" if real_services_reachable() else "embedded"
    if REQUIRE_SERVICES and wanted != "real":
        pytest.exit("NETHERLINK_REQUIRE_SERVICES=1 but RabbitMQ/MySQL/Redis are not reachable on 127.0.0.1 "
                    "(ports 5672, 3306, 6379): start them first", returncode=3)
    return wanted


@pytest.fixture(scope="session")
def log_dir():
    path = ROOT / "test-artifacts" / "logs" / RUN_ID
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def service_kind() -> str:
    """What this run tests against, "real" or "embedded" (tests/unit provisions its own of the same kind)."""
    return _choose_kind()


@pytest.fixture(scope="session")
def services(tmp_path_factory, service_kind):
    kind = service_kind
    tmp = tmp_path_factory.mktemp("services")
    svc: Services = provision_real(RUN_ID) if kind == "real" else provision_embedded(RUN_ID, tmp)
    # The test process reads the same settings as its children (assertions go to the same stores).
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV", "JWT_SECRET")}
    os.environ.update({k: v for k, v in svc.env().items() if k in saved})
    try:
        from app.storage import upgrade_schema

        upgrade_schema(svc.database_url)
        yield svc
    finally:
        svc.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def real_services(services):
    if not services.real:
        pytest.skip("needs the real RabbitMQ and MySQL")
    return services


@pytest.fixture(scope="session")
def storage(services):
    from app.config import Settings
    from app.storage import Storage

    s = Storage(Settings.from_env())
    yield s
    s.dispose()


class PushFakes:
    """Local APNs (HTTP/2, TLS), FCM v1 (+OAuth), Web Push (TLS, VAPID) and SMTP servers the push
    worker talks to."""

    def __init__(self, tmp):
        from tests.fakes.apns_server import FakeApnsServer
        from tests.fakes.fcm_server import FakeFcmServer
        from tests.fakes.smtp_server import FakeSmtp
        from tests.fakes.webpush_server import FakeWebPushServer

        self.apns = FakeApnsServer().start()
        self.fcm = FakeFcmServer().start()
        self.smtp = FakeSmtp().start()
        self.webpush = FakeWebPushServer().start()
        credentials = self.fcm.write_service_account(tmp / "fcm-service-account.json")
        self.env = {**self.apns.env(), "FCM_BASE_URL": self.fcm.url, "FCM_CREDENTIALS_FILE": str(credentials),
                    **self.webpush.env(),
                    "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.smtp.port), "SMTP_FROM": "NetherLink <nl@test>",
                    # Short windows so push tests take seconds, not minutes.
                    "PUSH_COALESCE_SECONDS": "1.0", "PUSH_RETRY_BASE_SECONDS": "0.2", "PUSH_MAX_RETRIES": "3",
                    "EMAIL_DIGEST_DELAY_SECONDS": "1.5", "PUSH_BADGE_COALESCE_SECONDS": "1.0"}

    def stop(self):
        self.apns.stop()
        self.fcm.stop()
        self.smtp.stop()
        self.webpush.stop()


class Cluster:
    """Two gateways, a persist, a dispatch and a push worker, shared by the tests."""

    def __init__(self, services: Services, log_dir, fakes: PushFakes):
        self.services = services
        self.log_dir = log_dir
        self.fakes = fakes
        # Redis is new for every run: the gateways start in the risk window after a Redis
        # loss (app/chat/recovery.py), which closes once the persist worker reports.
        self.gw1 = Gateway("gw1", services, log_dir, **fakes.env)
        self.gw2 = Gateway("gw2", services, log_dir, **fakes.env)
        self.persist = self.start_persist_worker()
        self.dispatch = self.start_dispatch_worker()
        self.push = self.start_push_worker()

    def start_persist_worker(self) -> Worker:
        # Chunks of two members: every group test fans out over several dispatch tasks.
        return Worker("persist", "private_messages,group_messages", self.services, self.log_dir,
                      GROUP_FANOUT_CHUNK="2", **self.fakes.env)

    def start_dispatch_worker(self) -> Worker:
        return Worker("dispatch", "offline_messages", self.services, self.log_dir, **self.fakes.env)

    def ensure_dispatch_worker(self) -> None:
        if not self.dispatch.alive():
            self.dispatch.stop()
            self.dispatch = self.start_dispatch_worker()

    def start_push_worker(self) -> Worker:
        # One process: the order in which pushes leave is the queue's priority order.
        return Worker("push", "push_tasks", self.services, self.log_dir, concurrency=1, **self.fakes.env)

    def ensure_persist_worker(self) -> None:
        if not self.persist.alive():
            self.persist.stop()
            self.persist = self.start_persist_worker()

    def ensure_push_worker(self) -> None:
        if not self.push.alive():
            self.push.stop()
            self.push = self.start_push_worker()

    def stop(self) -> None:
        for proc in (self.gw1, self.gw2, self.persist, self.dispatch, self.push):
            proc.stop()


@pytest.fixture(scope="session")
def push_fakes(tmp_path_factory):
    fakes = PushFakes(tmp_path_factory.mktemp("push-fakes"))
    yield fakes
    fakes.stop()


@pytest.fixture(scope="session")
def cluster(services, log_dir, push_fakes):
    c = Cluster(services, log_dir, push_fakes)
    yield c
    c.stop()


@pytest.fixture
def make_user(cluster):
    return lambda username=None: register_and_login(cluster.gw1.http, username)


@pytest.fixture
def out_of_risk_window(cluster, storage):
    """The shared gateways past the risk window after the last Redis loss (a new Redis at the start
    of the run, or a test's flush): from then on an ack does not wait for storage, which a test that
    stops or blocks persist needs."""
    sender, peer = register_and_login(cluster.gw1.http), register_and_login(cluster.gw1.http)
    clients = [ChatClient(g.ws, sender.token) for g in (cluster.gw1, cluster.gw2)]  # both intakes started
    try:
        assert clients[0].send_message(peer.user_id, "warm-up")["type"] == "ack"
        # (a few seconds more when a persist worker was killed inside the window: it must be known gone)
        wait_out_of_risk_window(storage.redis, cluster.gw1, cluster.gw2, timeout=60)
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def connect(cluster):
    """connect(user, gateway=None) -> ChatClient; closed after the test."""
    clients = []

    def _connect(user, gateway=None, use_header=False):
        client = ChatClient((gateway or cluster.gw1).ws, user.token, use_header=use_header)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


def pytest_unconfigure(config):
    # Keep logs of failing runs as CI artifacts; drop the rest.
    logs = ROOT / "test-artifacts" / "logs" / RUN_ID
    if logs.exists() and getattr(config, "_netherlink_failed", False) is False:
        shutil.rmtree(logs, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.config._netherlink_failed = True
