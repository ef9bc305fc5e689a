"""Connections to MySQL (or the embedded SQLite file) and Redis.

One `Storage` per process, built from Settings. It holds no request state, so
the gateway, the workers and the tests can each build their own.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool
from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

# Read-your-writes on a lagging replica: after a commit that wrote a user's data, the
# primary's GTID position; that user's reads go to the primary until the replica applied it.
REPLICA_FENCE_KEY = "replica:fence:{}"
REPLICA_FENCE_SECONDS = 3600  # longer than any lag a replica is still used with


def make_engine(url: str) -> Engine:
    """Engine with utf8mb4 on MySQL and WAL + busy timeout on SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # several worker processes share the file
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if parsed.get_backend_name() == "mysql" and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    # hide_parameters: error messages must not carry message text or password hashes into logs.
    return create_engine(parsed, pool_pre_ping=True, pool_recycle=3600, pool_size=10, max_overflow=20,
                         hide_parameters=True)


# What every Redis connection of a process gets, direct or through Sentinel.
_REDIS_OPTIONS = dict(timeout=5, decode_responses=True, socket_timeout=5, socket_connect_timeout=3,
                      health_check_interval=30)


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Connections to whichever node Sentinel names as primary, handed out like
    BlockingConnectionPool's (a caller waits for a free one past max_connections).

    MRO: SentinelConnectionPool's address and ownership checks, then
    BlockingConnectionPool's queue of connections, then ConnectionPool.
    """


def make_redis(settings: Settings, **overrides) -> redis.Redis:
    """The process's Redis client: REDIS_URL directly, or the Sentinel master named
    REDIS_SENTINEL_MASTER when REDIS_SENTINELS is set (db and password from REDIS_URL).

    A blocking pool: past max_connections a caller waits (up to 5 s) for a free
    connection instead of failing; a gateway's bursts (a presence rewrite, then
    every greenlet that queued behind it) stay errors-free.
    """
    options = {**_REDIS_OPTIONS, **overrides}  # e.g. a client_name, shorter timeouts
    max_connections = options.pop("max_connections", settings.redis_max_connections)
    if not settings.redis_sentinels:
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=max_connections, **options))
    url = redis.connection.parse_url(settings.redis_url)
    auth = {key: url[key] for key in ("db", "username", "password") if url.get(key) is not None}
    sentinel = Sentinel(settings.sentinel_addresses, socket_timeout=1, socket_connect_timeout=1)
    # After a failover the pool asks Sentinel again on its next connection, drops the
    # idle connections to the old primary, and a connection that finds it talks to a
    # replica (READONLY) reconnects: callers see errors only for the seconds until
    # Sentinel has promoted a replica.
    pool = BlockingSentinelPool(settings.redis_sentinel_master, sentinel, max_connections=max_connections,
                                **auth, **options)
    return redis.Redis(connection_pool=pool)


class Storage:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # History, sync pages and conversation lists may read from a replica. A
        # lagging replica only delays what a sync returns; the stream stays
        # gap-free because the cursor never passes what it has not returned.
        self.read_engine = make_engine(settings.database_replica_url) if settings.database_replica_url \
            else self.engine
        self.read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        self.redis = make_redis(settings)
        self._scripts: dict = {}

    def fence_writes(self, user_ids) -> None:
        """After a commit these users made (their message, read, recall, upload): each one's reads
        (`reader`) stay on the primary until the replica has applied it, so nobody misses their
        own write; what others wrote for them may lag like any replica read. Nothing to do
        without a replica."""
        user_ids = set(user_ids)
        if self.read_engine is self.engine or not user_ids:
            return
        try:
            with self.engine.connect() as conn:
                position = conn.execute(text(self._gtid_sql()[0])).scalar()
            pipe = self.redis.pipeline(transaction=False)
            for user_id in user_ids:
                pipe.set(REPLICA_FENCE_KEY.format(user_id), position, ex=REPLICA_FENCE_SECONDS)
            pipe.execute()
        except Exception as exc:  # the write stands; a read may lag behind it until the replica catches up
            log.warning("replica fence of %d user(s) not recorded (%s)", len(user_ids), exc.__class__.__name__)

    def reader(self, user_id: int) -> Engine:
        """Where to read this user's data: the replica once it has applied the user's last
        write (`fence_writes`), else the primary, which never hides a write."""
        if self.read_engine is self.engine:
            return self.engine
        try:
            fence = self.redis.get(REPLICA_FENCE_KEY.format(user_id))
            if not fence:
                return self.read_engine
            with self.read_engine.connect() as conn:
                applied = conn.execute(text(self._gtid_sql()[1]), {"position": fence}).scalar()
        except Exception:
            return self.engine  # cannot tell: the primary
        reached = 0 if self._is_mariadb() else 1
        return self.read_engine if applied == reached else self.engine

    def read_session_for(self, user_id: int) -> Session:
        """A session on `reader(user_id)`."""
        return Session(self.reader(user_id), expire_on_commit=False)

    def _is_mariadb(self) -> bool:
        return bool(getattr(self.engine.dialect, "is_mariadb", False))

    def _gtid_sql(self) -> tuple[str, str]:
        """(the primary's GTID position now, whether the replica has applied :position)."""
        if self._is_mariadb():  # MASTER_GTID_WAIT with no wait: 0 applied, -1 not yet
            return "SELECT @@GLOBAL.gtid_binlog_pos", "SELECT MASTER_GTID_WAIT(:position, 0)"
        return "SELECT @@GLOBAL.gtid_executed", "SELECT GTID_SUBSET(:position, @@GLOBAL.gtid_executed)"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self.sessions() as session:
            with session.begin():
                yield session

    def script(self, source: str):
        """A Lua script bound to this Redis, made once (EVALSHA on every call)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script

    @property
    def is_mysql(self) -> bool:
        return self.engine.dialect.name == "mysql"

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()
        self.redis.close()


def insert_ignoring_duplicates(model, is_mysql: bool):
    """INSERT that skips rows whose unique key exists (redelivery-safe bulk inserts).

    Not MySQL's INSERT IGNORE, which would also swallow truncation and other errors.
    """
    if is_mysql:
        from sqlalchemy.dialects.mysql import insert

        stmt = insert(model)
        key = model.__table__.primary_key.columns.values()[0].name
        return stmt.on_duplicate_key_update({key: stmt.table.c[key]})
    from sqlalchemy.dialects.sqlite import insert

    return insert(model).on_conflict_do_nothing()


def purge_in_batches(storage: Storage, model, *conditions, max_batches: int, batch: int = 1000) -> int:
    """Delete the rows matching `conditions` in primary-key batches of one transaction each
    (no long lock on a big table); at most `max_batches`, the rest at the next run."""
    removed = 0
    for _ in range(max_batches):
        with storage.session() as session:
            ids = session.scalars(select(model.id).where(*conditions).order_by(model.id).limit(batch)).all()
            if ids:
                session.execute(delete(model).where(model.id.in_(ids)))
        removed += len(ids)
        if len(ids) < batch:
            break
    return removed


def upgrade_schema(database_url: str) -> None:
    """Bring the database to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "models" / "migrations"))
    cfg.attributes["database_url"] = database_url
    os.environ.setdefault("NETHERLINK_ALEMBIC_QUIET", "1")
    command.upgrade(cfg, "head")
