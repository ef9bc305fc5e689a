"""A production-shaped set of engines on one machine (DESIGN §9): a 3-node RabbitMQ
cluster, a Redis primary with 2 replicas and 3 sentinels, and a MariaDB primary
with a GTID replica, all on loopback ports of their own, data and pid files under
var/cluster/. The machine's own RabbitMQ (5672), Redis (6379) and MariaDB (3306)
are never touched.

    python -m scripts.cluster up|down|status     (scripts/cluster.sh wraps this)

`status` prints the environment lines (BROKER_URL=…) ready to `export`. The tests
(tests/ha) use the same functions to start, kill and restart single nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("NETHERLINK_CLUSTER_DIR", ROOT / "var" / "cluster"))
HOST = "127.0.0.1"

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # not the /usr/sbin wrapper, which switches to the rabbitmq user
RABBIT_NODES = ("nl1", "nl2", "nl3")
RABBIT_PORTS = (5681, 5682, 5683)
RABBIT_DIST_PORTS = (25681, 25682, 25683)
REDIS_PORTS = (6391, 6392, 6393)  # the first starts as primary; Sentinel may promote another
SENTINEL_PORTS = (26391, 26392, 26393)
SENTINEL_MASTER = "netherlink"
MARIADB_PRIMARY_PORT, MARIADB_REPLICA_PORT = 3311, 3312
DATABASE = "netherlink"
COOKIE = "NETHERLINKCLUSTERCOOKIE"
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    """A node did not start, join or stop as it should."""


# -- processes and pid files -------------------------------------------------------

def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _wait(condition, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _pid_file(name: str) -> Path:
    return BASE / "run" / f"{name}.pid"


def pid_of(name: str) -> int | None:
    """The pid of a node we started, if it is still running."""
    try:
        pid = int(_pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    # A reused pid would be somebody else's process: ours all run in a directory under BASE.
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return pid if cwd.startswith(str(BASE)) else None


def _spawn(name: str, cmd: list[str], env: dict | None = None) -> int:
    (BASE / "run").mkdir(parents=True, exist_ok=True)
    (BASE / "log").mkdir(parents=True, exist_ok=True)
    log = open(BASE / "log" / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=BASE)
    log.close()
    _pid_file(name).write_text(str(proc.pid))
    return proc.pid


def kill(name: str, sig: int = signal.SIGKILL) -> None:
    """Signal one node we started (SIGKILL: a crash) and wait until it is gone."""
    pid = pid_of(name)
    if pid is None:
        return
    try:
        os.killpg(pid, sig)  # its own session: children (epmd is not one of them) go too
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + (30 if sig != signal.SIGKILL else 10)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # a zombie of ours (the tests' process started it) counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        if sig != signal.SIGKILL:
            kill(name, signal.SIGKILL)
            return
        raise ClusterError(f"{name} (pid {pid}) did not exit")
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# -- RabbitMQ ---------------------------------------------------------------------

def rabbit_node(i: int) -> str:
    return f"{RABBIT_NODES[i]}@localhost"


def _rabbit_env(i: int) -> dict:
    home = BASE / "rabbitmq" / "home"
    base = BASE / "rabbitmq" / RABBIT_NODES[i]
    return {
        # One Erlang cookie for the three nodes and for rabbitmqctl, in a HOME of our own.
        "HOME": str(home),
        "RABBITMQ_NODENAME": rabbit_node(i),
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(RABBIT_PORTS[i]),
        "RABBITMQ_DIST_PORT": str(RABBIT_DIST_PORTS[i]),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        # Our own (empty) env, config and plugin files: the machine's node has
        # listeners and plugins (management on 15672) that would clash.
        "RABBITMQ_CONF_ENV_FILE": str(BASE / "rabbitmq" / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(BASE / "rabbitmq" / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(BASE / "rabbitmq" / "enabled_plugins"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(BASE / "rabbitmq" / "advanced.config"),
        "ERL_EPMD_ADDRESS": HOST,
    }


def _prepare_rabbit() -> None:
    home = BASE / "rabbitmq" / "home"
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
    (BASE / "rabbitmq" / "rabbitmq-env.conf").write_text("")
    (BASE / "rabbitmq" / "enabled_plugins").write_text("[].\n")
    (BASE / "rabbitmq" / "advanced.config").write_text("[].\n")
    (BASE / "rabbitmq" / "rabbitmq.conf").write_text(
        "loopback_users.guest = false\n"
        # The disk alarm's default (50 MB) is fine; a 3-node cluster on one small disk
        # must not block publishers because the machine's node already uses memory.
        "vm_memory_high_watermark.relative = 0.2\n"
        "log.console = false\n"
        "log.file.level = info\n")


def rabbitmqctl(i: int, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", rabbit_node(i), *args],
                          env={**os.environ, **_rabbit_env(i)}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"rabbitmqctl -n {rabbit_node(i)} {' '.join(args)}: {proc.stderr.strip()[-500:]}")
    return proc


def start_rabbit(i: int) -> None:
    """Start RabbitMQ node i (with its data: a node that was killed rejoins its cluster)."""
    name = f"rabbit-{RABBIT_NODES[i]}"
    if pid_of(name) is not None:
        return
    _spawn(name, [str(RABBIT_BIN / "rabbitmq-server")], _rabbit_env(i))


def await_rabbit(i: int) -> None:
    """Wait until node i serves (await_startup fails at once while the node is not yet
    registered with epmd, so ask again until then)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        proc = rabbitmqctl(i, "await_startup", "--timeout", str(int(START_TIMEOUT)), timeout=START_TIMEOUT + 10,
                           check=False)
        if proc.returncode == 0:
            return
        if not rabbit_running(i) or time.monotonic() > deadline:
            raise ClusterError(f"RabbitMQ node {rabbit_node(i)} did not start: {proc.stderr.strip()[-300:]}")
        time.sleep(0.3)


def kill_rabbit(i: int) -> None:
    kill(f"rabbit-{RABBIT_NODES[i]}")


def rabbit_running(i: int) -> bool:
    return pid_of(f"rabbit-{RABBIT_NODES[i]}") is not None


def _form_rabbit_cluster() -> None:
    for i in (1, 2):
        status = rabbitmqctl(i, "cluster_status", "--formatter", "json").stdout
        if rabbit_node(0) in status:
            continue
        rabbitmqctl(i, "stop_app")
        rabbitmqctl(i, "join_cluster", rabbit_node(0))
        rabbitmqctl(i, "start_app")


def broker_urls() -> list[str]:
    return [f"amqp://guest:guest@{HOST}:{port}//" for port in RABBIT_PORTS]


# -- Redis ------------------------------------------------------------------------

def _redis_conf(i: int) -> Path:
    return BASE / "redis" / f"redis-{REDIS_PORTS[i]}.conf"


def start_redis(i: int, replica_of: int | None = None) -> None:
    """Redis node i; a restarted old primary comes back as a replica (Sentinel reconfigures it too)."""
    name = f"redis-{REDIS_PORTS[i]}"
    if pid_of(name) is not None:
        return
    data = BASE / "redis" / str(REDIS_PORTS[i])
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"bind {HOST}", f"port {REDIS_PORTS[i]}", f"dir {data}", "save \"\"", "appendonly no",
             "repl-diskless-sync yes", "repl-diskless-sync-delay 0", f"logfile {BASE / 'log' / (name + '.log')}",
             f"replica-announce-ip {HOST}"]
    if replica_of is not None:
        lines.append(f"replicaof {HOST} {REDIS_PORTS[replica_of]}")
    _redis_conf(i).parent.mkdir(parents=True, exist_ok=True)
    (BASE / "log").mkdir(parents=True, exist_ok=True)
    _redis_conf(i).write_text("\n".join(lines) + "\n")
    _spawn(name, ["redis-server", str(_redis_conf(i))])


def kill_redis(i: int) -> None:
    kill(f"redis-{REDIS_PORTS[i]}")


def start_sentinel(i: int) -> None:
    name = f"sentinel-{SENTINEL_PORTS[i]}"
    if pid_of(name) is not None:
        return
    conf = BASE / "redis" / f"sentinel-{SENTINEL_PORTS[i]}.conf"
    if not conf.exists():  # Sentinel rewrites its file with what it learnt; a restart keeps that
        conf.write_text("\n".join([
            f"bind {HOST}", f"port {SENTINEL_PORTS[i]}", f"dir {BASE / 'redis'}",
            f"logfile {BASE / 'log' / (name + '.log')}", f"sentinel announce-ip {HOST}",
            f"sentinel monitor {SENTINEL_MASTER} {HOST} {REDIS_PORTS[0]} 2",
            # Seconds, not the default 30 s: the failover is what tests/ha measures.
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 2000",
            f"sentinel failover-timeout {SENTINEL_MASTER} 10000",
            f"sentinel parallel-syncs {SENTINEL_MASTER} 2",
        ]) + "\n")
    _spawn(name, ["redis-server", str(conf), "--sentinel"])


def redis_cli(port: int, *args: str) -> str:
    proc = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10)
    return proc.stdout.strip()


def redis_primary_port() -> int | None:
    """The primary's port as the sentinels see it."""
    for port in SENTINEL_PORTS:
        if port_open(port):
            out = redis_cli(port, "SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER).split()
            if len(out) == 2:
                return int(out[1])
    return None


def redis_index(port: int) -> int:
    return REDIS_PORTS.index(port)


def _redis_replicas_synced() -> bool:
    info = redis_cli(REDIS_PORTS[0], "INFO", "replication")
    return info.count("state=online") == len(REDIS_PORTS) - 1


def _sentinels_know_all() -> bool:
    for port in SENTINEL_PORTS:
        fields = redis_cli(port, "SENTINEL", "master", SENTINEL_MASTER).split("\n")
        values = dict(zip(fields[::2], fields[1::2]))
        if values.get("num-slaves") != str(len(REDIS_PORTS) - 1) or \
                values.get("num-other-sentinels") != str(len(SENTINEL_PORTS) - 1):
            return False
    return True


# -- MariaDB ----------------------------------------------------------------------

def _mariadb_dir(port: int) -> Path:
    return BASE / "mariadb" / str(port)


def mariadb_socket(port: int) -> Path:
    return _mariadb_dir(port) / "mariadb.sock"


def _install_mariadb() -> None:
    primary, replica = _mariadb_dir(MARIADB_PRIMARY_PORT), _mariadb_dir(MARIADB_REPLICA_PORT)
    if (primary / "data" / "mysql").exists():
        return
    primary.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={primary / 'data'}", "--user=root",
                           "--auth-root-authentication-method=normal", "--skip-test-db"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ClusterError(f"mariadb-install-db: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    # The replica starts as a copy of the empty primary: GTID replication takes it from there.
    shutil.copytree(primary / "data", replica / "data", symlinks=True)


def start_mariadb(port: int) -> None:
    name = f"mariadb-{port}"
    if pid_of(name) is not None:
        return
    d = _mariadb_dir(port)
    server_id = 1 if port == MARIADB_PRIMARY_PORT else 2
    cmd = ["mariadbd", "--no-defaults", f"--datadir={d / 'data'}", f"--socket={mariadb_socket(port)}",
           f"--pid-file={d / 'mariadbd.pid'}", f"--port={port}", f"--bind-address={HOST}", "--user=root",
           f"--server-id={server_id}", "--log-bin=binlog", "--binlog-format=ROW", "--log-slave-updates=1",
           "--skip-name-resolve", f"--log-error={BASE / 'log' / (name + '.err')}",
           "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M", "--innodb-flush-log-at-trx-commit=2",
           "--sync-binlog=0", "--max-connections=500", "--character-set-server=utf8mb4",
           "--collation-server=utf8mb4_unicode_ci", "--gtid-strict-mode=1"]
    if port == MARIADB_REPLICA_PORT:
        cmd += ["--read-only=1", "--skip-slave-start=0", "--relay-log=relay"]
    _spawn(name, cmd)


def mariadb(port: int, sql: str, check: bool = True) -> str:
    proc = subprocess.run(["mariadb", "--no-defaults", "-h", HOST, "-P", str(port), "-u", "root", "-N", "-B",
                           "-e", sql], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"mariadb :{port}: {sql[:80]}: {proc.stderr.strip()}")
    return proc.stdout


def _mariadb_up(port: int) -> bool:
    return port_open(port) and subprocess.run(
        ["mariadb", "--no-defaults", "-h", HOST, "-P", str(port), "-u", "root", "-e", "SELECT 1"],
        capture_output=True, timeout=10).returncode == 0


def _setup_replication() -> None:
    status = mariadb(MARIADB_REPLICA_PORT, "SHOW SLAVE STATUS")
    if not status.strip():
        mariadb(MARIADB_REPLICA_PORT,
                f"CHANGE MASTER TO MASTER_HOST='{HOST}', MASTER_PORT={MARIADB_PRIMARY_PORT}, MASTER_USER='root', "
                "MASTER_PASSWORD='', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE")
    mariadb(MARIADB_PRIMARY_PORT, f"CREATE DATABASE IF NOT EXISTS `{DATABASE}` "
                                  "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    _wait(lambda: DATABASE in mariadb(MARIADB_REPLICA_PORT, "SHOW DATABASES"), "the replica to replicate")


def stop_replication() -> None:
    """The replica stops applying the primary's changes: it lags from now on."""
    mariadb(MARIADB_REPLICA_PORT, "STOP SLAVE")


def start_replication() -> None:
    mariadb(MARIADB_REPLICA_PORT, "START SLAVE")


def replica_caught_up() -> bool:
    primary = mariadb(MARIADB_PRIMARY_PORT, "SELECT @@gtid_binlog_pos").strip()
    return mariadb(MARIADB_REPLICA_PORT, "SELECT @@gtid_slave_pos").strip() == primary


# -- the whole cluster ------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    broker_url: str
    redis_sentinels: str
    redis_sentinel_master: str
    redis_url: str
    database_url: str
    database_replica_url: str

    def lines(self) -> list[str]:
        return [f"BROKER_URL='{self.broker_url}'", "RABBITMQ_QUEUE_TYPE=quorum",
                f"REDIS_SENTINELS={self.redis_sentinels}", f"REDIS_SENTINEL_MASTER={self.redis_sentinel_master}",
                f"REDIS_URL={self.redis_url}", f"DATABASE_URL='{self.database_url}'",
                f"DATABASE_REPLICA_URL='{self.database_replica_url}'"]

    def as_dict(self) -> dict[str, str]:
        return {"BROKER_URL": self.broker_url, "RABBITMQ_QUEUE_TYPE": "quorum",
                "REDIS_SENTINELS": self.redis_sentinels, "REDIS_SENTINEL_MASTER": self.redis_sentinel_master,
                "REDIS_URL": self.redis_url, "DATABASE_URL": self.database_url,
                "DATABASE_REPLICA_URL": self.database_replica_url}


def env(database: str = DATABASE) -> Env:
    def db(port: int) -> str:
        return f"mysql+pymysql://root@{HOST}:{port}/{database}?charset=utf8mb4"

    return Env(";".join(broker_urls()), ",".join(f"{HOST}:{p}" for p in SENTINEL_PORTS), SENTINEL_MASTER,
               # With REDIS_SENTINELS, REDIS_URL gives only the db (and password): the host is Sentinel's answer.
               f"redis://{HOST}:{REDIS_PORTS[0]}/0", db(MARIADB_PRIMARY_PORT), db(MARIADB_REPLICA_PORT))


def names() -> list[str]:
    return ([f"rabbit-{n}" for n in RABBIT_NODES] + [f"redis-{p}" for p in REDIS_PORTS]
            + [f"sentinel-{p}" for p in SENTINEL_PORTS] + [f"mariadb-{p}" for p in (MARIADB_PRIMARY_PORT,
                                                                                     MARIADB_REPLICA_PORT)])


def running() -> dict[str, int | None]:
    return {name: pid_of(name) for name in names()}


def _check_ports_free() -> None:
    ours = {n for n, pid in running().items() if pid}
    for name, port in [*((f"rabbit-{n}", p) for n, p in zip(RABBIT_NODES, RABBIT_PORTS)),
                       *((f"redis-{p}", p) for p in REDIS_PORTS), *((f"sentinel-{p}", p) for p in SENTINEL_PORTS),
                       *((f"mariadb-{p}", p) for p in (MARIADB_PRIMARY_PORT, MARIADB_REPLICA_PORT))]:
        if name not in ours and port_open(port):
            raise ClusterError(f"port {port} ({name}) is taken by a process this script did not start")


def up() -> Env:
    """Start every node not running (a fresh cluster when none is), wait until all serve."""
    if not any(running().values()) and BASE.exists():
        shutil.rmtree(BASE)  # leftovers of a cluster that was killed rather than brought down
    _check_ports_free()
    (BASE / "log").mkdir(parents=True, exist_ok=True)
    _prepare_rabbit()
    for i in range(3):
        start_rabbit(i)
    start_redis(0)
    for i in (1, 2):
        start_redis(i, replica_of=0)
    for i in range(3):
        start_sentinel(i)
    _install_mariadb()
    for port in (MARIADB_PRIMARY_PORT, MARIADB_REPLICA_PORT):
        start_mariadb(port)
    with ThreadPoolExecutor(4) as pool:  # the nodes boot side by side
        rabbits = [pool.submit(await_rabbit, i) for i in range(3)]
        dbs = [pool.submit(_wait, lambda p=p: _mariadb_up(p), f"mariadb :{p}")
               for p in (MARIADB_PRIMARY_PORT, MARIADB_REPLICA_PORT)]
        for future in (*rabbits, *dbs):
            future.result()
    _form_rabbit_cluster()
    _setup_replication()
    _wait(_redis_replicas_synced, "the Redis replicas to sync")
    _wait(_sentinels_know_all, "the sentinels to see the replicas and each other")
    return env()


def down() -> None:
    """Stop everything this script started and remove its data, not its logs (idempotent)."""
    for name in names():
        kill(name, signal.SIGTERM)
    # mariadbd and beam leave nothing behind once their pid is gone; epmd is the machine's, shared.
    # The logs stay (for a failed test run) until the next `up`.
    if BASE.exists():
        for path in BASE.iterdir():
            if path.name != "log":
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def status() -> int:
    state = running()
    for name, pid in state.items():
        print(f"# {name}: {'pid ' + str(pid) if pid else 'not running'}", file=sys.stderr)
    if not all(state.values()):
        print("# the cluster is not (fully) up: bash scripts/cluster.sh up", file=sys.stderr)
    primary = redis_primary_port()
    if primary:
        print(f"# redis primary: {HOST}:{primary}", file=sys.stderr)
    for line in env().lines():
        print(line)
    return 0 if all(state.values()) else 1


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "up":
        started = time.monotonic()
        up()
        print(f"# cluster up in {time.monotonic() - started:.1f}s; data under {BASE}", file=sys.stderr)
        return status()
    if command == "down":
        down()
        print("# cluster down", file=sys.stderr)
        return 0
    if command == "status":
        return status()
    print("usage: scripts/cluster.sh up|down|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        sys.exit(1)
