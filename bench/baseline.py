"""The ceiling of the raw parts on this machine: `python -m bench.baseline`.

Provisions its own database, vhost and Redis db (like the tests: real services
when they answer on 127.0.0.1, else embedded) and measures, one after the
other on those same services:

  publish   confirmed publishes of persistent messages to a durable queue
            (py-amqp, what kombu uses): one at a time (wait for each confirm,
            as the gateway does before an ack), and windowed (up to --window
            unconfirmed, confirms handled as they come);
  consume   those messages back with a manual ack per message, at prefetch 1
            (Celery's one message in flight per process) and at --prefetch;
  insert    rows into a scratch table of the run's database (the shape of a
            message row): one INSERT + COMMIT per row, and multi-row INSERTs
            of --batch rows per COMMIT;
  redis     SET one command per round trip, SET/INCR pipelined in batches of
            --batch, and one Lua script call per round trip (a script that,
            like the unread counter, does SADD + HINCRBY + EXPIRE);
  chain     a naive pipeline through real workers: one trivial Celery task per
            step, three steps per message (bench/celery_chain.py, the
            pipeline's task settings), three workers of --chain-concurrency
            processes; messages/s from the first publish to the last step.

Every figure is reported as operations per second, so that the pipeline's
figures (docs/benchmarks.md) can be given as ratios of these ceilings,
measured in the same run. On the embedded defaults (no RabbitMQ) the
publish/consume parts are skipped.

Prints each figure as it is measured and a one-line JSON summary. Exit status
1 when a message was lost or duplicated (consume, chain) or a count is off.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from bench import close_run

PAYLOAD = json.dumps({"msg_id": "0", "sender_id": "1", "to": "2", "client_msg_id": "x" * 32, "content": "y" * 200,
                      "timestamp": 0, "conversation_id": "p_1_2", "origin_conn": "gw1-" + "z" * 16})
LUA = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


class Report:
    def __init__(self):
        self.t0 = time.monotonic()
        self.figures: dict = {}

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def add(self, key: str, what: str, count: int, seconds: float, unit: str = "/s") -> None:
        self.figures[key] = rate(count, seconds)
        self.say(f"{what}: {count} in {seconds:.2f} s = {self.figures[key]:,.0f}{unit}")


def amqp_connection(broker_url: str, confirm: bool):
    import amqp

    url = urlparse(broker_url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    conn = amqp.Connection(host=f"{url.hostname}:{url.port or 5672}", userid=unquote(url.username or "guest"),
                           password=unquote(url.password or "guest"), virtual_host=vhost, confirm_publish=confirm)
    conn.connect()
    return conn


def bench_amqp(report: Report, broker_url: str, count: int, window: int, prefetch: int) -> dict:
    import amqp

    queue = "bench_baseline"
    body = PAYLOAD.encode()

    # One at a time: basic_publish waits for the confirm (what the gateway does per message).
    conn = amqp_connection(broker_url, confirm=True)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, auto_delete=False)
    ch.basic_publish(amqp.Message(body, delivery_mode=2), exchange="", routing_key=queue)  # confirm mode on
    start = time.perf_counter()
    for _ in range(count):
        ch.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json"), exchange="",
                         routing_key=queue)
    report.add("publish_confirmed_one_at_a_time", "publish, one confirm at a time", count,
               time.perf_counter() - start)
    conn.close()

    # Windowed: publish without waiting, at most `window` unconfirmed; confirms arrive as acks (multiple or not).
    conn = amqp_connection(broker_url, confirm=False)
    ch = conn.channel()
    ch.confirm_select()
    pending: set[int] = set()
    nacked = [0]
    next_tag = [0]

    def on_ack(tag, multiple):
        if multiple:
            pending.difference_update([t for t in pending if t <= tag])
        else:
            pending.discard(tag)

    def on_nack(tag, multiple):
        nacked[0] += 1
        on_ack(tag, multiple)

    ch.events["basic_ack"].add(on_ack)
    ch.events["basic_nack"].add(on_nack)
    start = time.perf_counter()
    for _ in range(count):
        while len(pending) >= window:
            conn.drain_events(timeout=10)
        ch.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json"), exchange="",
                         routing_key=queue)
        next_tag[0] += 1
        pending.add(next_tag[0])
    while pending:
        conn.drain_events(timeout=10)
    report.add("publish_confirmed_windowed", f"publish, window of {window} unconfirmed", count,
               time.perf_counter() - start)
    conn.close()
    published = 2 * count + 1

    # Consume them back, manual ack per message: prefetch 1, then `prefetch`.
    figures = {"nacked": nacked[0], "published": published}
    consumed_total = 0
    for label, qos in (("consume_prefetch_1", 1), (f"consume_prefetch_{prefetch}", prefetch)):
        n = count if qos == 1 else published - consumed_total
        conn = amqp_connection(broker_url, confirm=False)
        ch = conn.channel()
        ch.basic_qos(0, qos, False)
        got = [0]

        def on_message(message, ch=ch, got=got):
            got[0] += 1
            ch.basic_ack(message.delivery_tag)

        tag = ch.basic_consume(queue, callback=on_message, no_ack=False)
        start = time.perf_counter()
        while got[0] < n:
            conn.drain_events(timeout=10)
        elapsed = time.perf_counter() - start
        ch.basic_cancel(tag)  # a message delivered meanwhile is acked and counted too
        report.add(label, f"consume, prefetch {qos}, ack each", got[0], elapsed)
        consumed_total += got[0]
        conn.close()
    conn = amqp_connection(broker_url, confirm=False)
    ch = conn.channel()
    _, left, _ = ch.queue_declare(queue, durable=True, auto_delete=False, passive=True)
    ch.queue_delete(queue)
    conn.close()
    figures.update(consumed=consumed_total, left_in_queue=left)
    return figures


def bench_db(report: Report, database_url: str, single: int, batched: int, batch: int) -> dict:
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    mysql = engine.dialect.name == "mysql"
    p = "%s" if mysql else "?"
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS bench_scratch")
        cur.execute("CREATE TABLE bench_scratch (id BIGINT PRIMARY KEY, conversation_id VARCHAR(100) NOT NULL, "
                    "sender_id BIGINT NOT NULL, client_msg_id VARCHAR(64) NOT NULL, content TEXT NOT NULL, "
                    "ts BIGINT NOT NULL)" + (" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4" if mysql else ""))
        conn.commit()
        sql = f"INSERT INTO bench_scratch (id, conversation_id, sender_id, client_msg_id, content, ts) " \
              f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
        content = "y" * 200

        def row(i):
            return (i, "p_1_2", 1, f"c{i}", content, 0)

        start = time.perf_counter()
        for i in range(single):
            cur.execute(sql, row(i))
            conn.commit()
        report.add("db_insert_commit_one_row", "insert + commit, one row each", single, time.perf_counter() - start)
        start = time.perf_counter()
        for first in range(single, single + batched, batch):
            cur.executemany(sql, [row(i) for i in range(first, min(single + batched, first + batch))])
            conn.commit()
        report.add("db_insert_batched_rows", f"insert, {batch} rows per statement and commit", batched,
                   time.perf_counter() - start)
        cur.execute("SELECT COUNT(*) FROM bench_scratch")
        stored = cur.fetchone()[0]
        figures = {"db_rows_stored": stored}
        if mysql:
            cur.execute("SELECT @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@log_bin")
            flush, sync_binlog, log_bin = cur.fetchone()
            figures["innodb_flush_log_at_trx_commit"] = int(flush)
            figures["binlog"] = bool(int(log_bin))
        cur.execute("DROP TABLE bench_scratch")
        conn.commit()
        return figures
    finally:
        conn.close()
        engine.dispose()


def bench_redis(report: Report, redis_url: str, single: int, pipelined: int, batch: int, lua: int) -> dict:
    import redis

    client = redis.Redis.from_url(redis_url)
    start = time.perf_counter()
    for i in range(single):
        client.set(f"bench:s:{i}", "x")
    report.add("redis_set_one_per_round_trip", "Redis SET, one per round trip", single, time.perf_counter() - start)
    start = time.perf_counter()
    for first in range(0, pipelined, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(pipelined, first + batch)):
            if i % 2:
                pipe.incr("bench:counter")
            else:
                pipe.set(f"bench:p:{i}", "x")
        pipe.execute()
    report.add("redis_pipelined_ops", f"Redis SET/INCR pipelined, {batch} per round trip", pipelined,
               time.perf_counter() - start)
    script = client.register_script(LUA)
    start = time.perf_counter()
    for i in range(lua):
        script(keys=["bench:lua:set", "bench:lua:hash"], args=[i, f"c{i % 50}"])
    report.add("redis_lua_calls", "Redis Lua call (SADD + HINCRBY + EXPIRE), one per round trip", lua,
               time.perf_counter() - start)
    checks = {"redis_counter": int(client.get("bench:counter") or 0), "redis_lua_members": client.scard("bench:lua:set")}
    for pattern in ("bench:s:*", "bench:p:*"):
        keys = list(client.scan_iter(pattern, count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
    client.delete("bench:counter", "bench:lua:set", "bench:lua:hash")
    client.close()
    return checks


def bench_chain(report: Report, services, tmp: Path, count: int, concurrency: int) -> dict:
    import redis

    from scripts.processes import BIN
    from tests.harness import Process

    env = services.env()
    procs = []

    class ChainWorker(Process):
        def __init__(self, step: int):
            self.node = f"chain{step}-{uuid.uuid4().hex[:6]}"
            super().__init__(f"worker-chain{step}", [
                str(BIN / "celery"), "-A", "bench.celery_chain", "worker", "-Q", f"bench_step{step}", "-n",
                f"{self.node}@%h", "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-mingle",
                "--without-gossip"], env, tmp)
            procs.append(self)
            self._wait_started(self._ready, 60, f"chain worker {step} ready")

        def _ready(self) -> bool:
            if not self.alive():
                raise AssertionError(f"chain worker exited:\n{self.log_text()[-3000:]}")
            return f"{self.node}@" in self.log_text() and " ready." in self.log_text()

    os.environ["BROKER_URL"], os.environ["REDIS_URL"] = services.broker_url, services.redis_url
    from bench import celery_chain

    client = redis.Redis.from_url(services.redis_url)
    client.delete(celery_chain.DONE_KEY, celery_chain.RUNS_KEY)
    try:
        report.say(f"starting 3 chain workers (--concurrency {concurrency} each)...")
        for step in (1, 2, 3):
            ChainWorker(step)
        start = time.perf_counter()
        for n in range(count):
            celery_chain.step1.apply_async(args=[n, PAYLOAD])
        published = time.perf_counter() - start
        report.say(f"chain: {count} first steps published in {published:.2f} s; waiting for the last steps...")
        deadline = time.monotonic() + max(120.0, count / 10)
        done = 0
        last_note = time.monotonic()
        while time.monotonic() < deadline:
            done = client.scard(celery_chain.DONE_KEY)
            if done >= count:
                break
            time.sleep(0.05)
            if time.monotonic() - last_note >= 5:
                last_note = time.monotonic()
                report.say(f"chain: {done}/{count} messages through all three steps")
        report.add("celery_chain_messages", "naive chain, 3 Celery tasks per message", done,
                   time.perf_counter() - start)
        runs = int(client.get(celery_chain.RUNS_KEY) or 0)
        return {"chain_sent": count, "chain_done": done, "chain_last_step_runs": runs,
                "chain_publish_per_second": rate(count, published)}
    finally:
        for proc in reversed(procs):
            proc.stop()
        client.delete(celery_chain.DONE_KEY, celery_chain.RUNS_KEY)
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="AMQP messages per publish figure")
    parser.add_argument("--window", type=int, default=256, help="unconfirmed publishes allowed in flight")
    parser.add_argument("--prefetch", type=int, default=200, help="prefetch of the second consume figure")
    parser.add_argument("--rows", type=int, default=3000, help="rows inserted one per commit")
    parser.add_argument("--batched-rows", type=int, default=50_000, help="rows inserted in batches")
    parser.add_argument("--batch", type=int, default=500, help="rows per batched INSERT; Redis commands per pipeline")
    parser.add_argument("--redis-ops", type=int, default=10_000, help="Redis SETs and Lua calls one at a time")
    parser.add_argument("--redis-pipelined", type=int, default=200_000, help="Redis commands pipelined")
    parser.add_argument("--chain-messages", type=int, default=2000, help="messages through the 3-task Celery chain")
    parser.add_argument("--chain-concurrency", type=int, default=2, help="processes per chain worker")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if min(args.messages, args.window, args.prefetch, args.rows, args.batched_rows, args.batch, args.redis_ops,
           args.redis_pipelined, args.chain_messages, args.chain_concurrency) < 1:
        parser.error("every count must be at least 1")

    from tests.harness import provision_embedded, provision_real, real_services_reachable

    signal.signal(signal.SIGTERM, interrupted)  # `kill` cleans up like Ctrl-C
    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-baseline-"))
    services = provision_real(uuid.uuid4().hex[:10]) if kind == "real" else provision_embedded("bench-base", tmp)
    report, ok = Report(), False
    try:
        report.say(f"{kind} services; logs in {tmp}")
        checks: dict = {}
        if services.broker_url.startswith("amqp"):
            checks.update(bench_amqp(report, services.broker_url, args.messages, args.window, args.prefetch))
        else:
            report.say("no RabbitMQ (embedded defaults): publish and consume figures skipped")
        checks.update(bench_db(report, services.database_url, args.rows, args.batched_rows, args.batch))
        checks.update(bench_redis(report, services.redis_url, args.redis_ops, args.redis_pipelined, args.batch,
                                  args.redis_ops))
        checks.update(bench_chain(report, services, tmp, args.chain_messages, args.chain_concurrency))

        lost = duplicated = 0
        if "published" in checks:
            lost += checks["published"] - checks["consumed"] - checks["left_in_queue"]
            duplicated += max(0, checks["consumed"] - checks["published"])
        lost += checks["chain_sent"] - checks["chain_done"]
        duplicated += max(0, checks["chain_last_step_runs"] - checks["chain_done"])
        counts_ok = (checks["db_rows_stored"] == args.rows + args.batched_rows
                     and checks["redis_counter"] == args.redis_pipelined // 2
                     and checks["redis_lua_members"] == args.redis_ops and not checks.get("nacked"))
        summary = {"bench": "baseline", "services": kind, "messages": args.messages, "window": args.window,
                   "prefetch": args.prefetch, "rows": args.rows, "batched_rows": args.batched_rows,
                   "batch": args.batch, "chain_messages": args.chain_messages,
                   "chain_concurrency": args.chain_concurrency, **report.figures, **checks,
                   "lost": lost, "duplicated": duplicated}
        ok = lost == 0 and duplicated == 0 and counts_ok
        summary["ok"] = ok
        print(json.dumps(summary), flush=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
