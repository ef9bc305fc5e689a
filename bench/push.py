"""Pushes per second of one push worker: `python -m bench.push --users 3000`.

Provisions its own database, vhost and Redis db (like the tests: real services
when they answer on 127.0.0.1, else embedded) and starts the local APNs
(tests/fakes/apns_server.py: HTTP/2 over TLS, checks every request like Apple)
in this process. N offline users each have one iOS device and one unread
private message (rows made directly in the database, as persist and
dispatch would leave them).

Two ways in, both through the real tasks:
  --stage deliver (default): the bench plans the pushes with app.push.planning.plan_pushes
      (one pending push_log row per user, badge and preview filled in, which
      is what send_push does) and queues one deliver_push task per row;
  --stage send: the bench queues one send_push task per user, and the worker
      plans and sends the pushes itself (send_push: one batch plans many users
      and makes their first attempts at once).
The tasks are queued before the worker starts; then ONE push worker
(push_tasks, --concurrency processes; default 8 as in deploy/) drains them.
The rate is N / (last APNs request - first APNs request), and end to end
N / (every push_log row success - worker ready), which also counts what
runs before the first request (in --stage send, planning); the bench also
waits until every push_log row is `success` and checks that the fake
accepted exactly one notification per device, and nothing else. It also
reports the worker's CPU time per push (all its processes, from the first
request to the last row), which other load on the machine disturbs less.

--badge-sync mixes badge-sync traffic in (docs/push.md §4.4): every user has three devices (iOS,
Android, a Web Push subscription at the local push service fake) and gets the notification on
all three; as soon as a user's three are out, the bench reads that user's message on a fourth
device, at the domain level the gateway's `read` handler calls (status read, unread recount,
tasks.publish.queue_badge_syncs; no gateway), while other users' notifications are still being
sent, so one worker drains both. --burst-users K of them read 100 times in a burst. It reports
pushes/s over all providers (alerts and silent pushes), and checks that each device got exactly
one notification and at most one silent push per coalescing window
(PUSH_BADGE_COALESCE_SECONDS, default 3 s).

--stage client measures the raw part instead: ApnsClient.send_many alone, in
a process of its own, against the fake in this one (no database, broker or
Celery): the ceiling of the APNs client and fake on this machine.

Prints progress every 2 s and a one-line JSON summary with the worker's task
times (from its log). --py-spy FILE records the worker's processes while it
drains. Exit status 1 when a push is missing, duplicated, not `success`, or
was retried.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench import close_run
from bench.load import ms, percentile

PROGRESS_EVERY = 2.0
TASK_LINE = re.compile(r"Task tasks\.pipeline\.(\w+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")
PROVIDER_LINE = re.compile(r"push \d+ \(msg \d+, apns\): (\w+) after (\d+) ms")
BATCH_LINE = re.compile(r"delivered \d+ push\(es\) from (\d+) task\(s\)")
PLAN_LINE = re.compile(r"planned pushes of \d+ user\(s\) from (\d+) task\(s\)")


def seed(storage, prefix: str, count: int) -> tuple[list[int], dict[int, str]]:
    """N users, each with an iOS device and one unread private message from one sender."""
    from sqlalchemy import insert, select

    from app.chat.conversations import private_conversation_id
    from models import Device, Message, User

    with storage.session() as session:
        session.execute(insert(User), [{"username": f"{prefix}sender", "password_hash": "!bench"}])
        for start in range(0, count, 5000):
            session.execute(insert(User), [{"username": f"{prefix}{i}", "password_hash": "!bench"}
                                           for i in range(start, min(count, start + 5000))])
    with storage.sessions() as session:
        sender = session.scalar(select(User.id).where(User.username == f"{prefix}sender"))
        users = session.scalars(select(User.id).where(User.username.like(f"{prefix}%"), User.id != sender)
                                .order_by(User.id)).all()
    tokens = {uid: secrets.token_hex(32) for uid in users}
    now = int(time.time() * 1000)
    base_id = now << 22
    with storage.session() as session:
        for start in range(0, count, 5000):
            chunk = users[start:start + 5000]
            session.execute(insert(Device), [{"user_id": uid, "platform": "ios", "token": tokens[uid]}
                                             for uid in chunk])
            session.execute(insert(Message), [{
                "id": base_id + start + i, "conversation_id": private_conversation_id(sender, uid),
                "sender_id": sender, "receiver_id": uid, "client_msg_id": f"push-{uid}", "message_type": "text",
                "content": f"are we still on for lunch, user {uid}?", "extra": None, "is_group": False,
                "timestamp": now, "status": 0} for i, uid in enumerate(chunk)])
    return list(users), tokens


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants now alive, from /proc (Linux)."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def worker_times(log_text: str) -> dict:
    """Task run times and APNs call times from the worker's INFO log."""
    tasks: dict[str, list[float]] = collections.defaultdict(list)
    for name, seconds in TASK_LINE.findall(log_text):
        tasks[name].append(float(seconds))
    calls = [int(m) / 1000 for outcome, m in PROVIDER_LINE.findall(log_text) if outcome == "Delivered"]
    out = {}
    for name, values in sorted(tasks.items()):
        out[f"{name}_tasks"] = len(values)
        out[f"{name}_ms_mean"] = ms(statistics.fmean(values))
        out[f"{name}_ms_p99"] = ms(percentile(values, 99))
    batches = [int(n) for n in BATCH_LINE.findall(log_text)]
    if batches:
        out["deliver_batches"] = len(batches)
        out["deliver_batch_mean"] = round(statistics.fmean(batches), 1)
    plans = [int(n) for n in PLAN_LINE.findall(log_text)]
    if plans:
        out["send_batches"] = len(plans)
        out["send_batch_mean"] = round(statistics.fmean(plans), 1)
    if calls:
        out["apns_call_ms_mean"] = ms(statistics.fmean(calls))
        out["apns_call_ms_p99"] = ms(percentile(calls, 99))
    return out


CLIENT_CODE = """
import json, os, secrets, sys, time
from app.config import Settings
from app.push.providers import Delivered, PushRequest
from app.push.providers.apns import ApnsClient
users, batch = int(sys.argv[1]), int(sys.argv[2])
pushes = [(PushRequest(token=secrets.token_hex(32), title="alice", body=f"are we still on for lunch, user {i}?",
                       badge=1, conversation_id=f"p_1_{i}", msg_id=str(i)) for i in range(users)]
with ApnsClient(Settings.from_env()) as client:
    client.send_many(pushes[:10])  # connection and provider token
    started, cpu = time.monotonic(), time.process_time()
    outcomes = [o for i in range(0, users, batch) for o in client.send_many(pushes[i:i + batch])]
    took, cpu = time.monotonic() - started, time.process_time() - cpu
print(json.dumps({"pushes_per_second": round(users / took, 1), "client_cpu_ms_per_push": round(1000 * cpu / users, 2),
                  "delivered": sum(isinstance(o, Delivered) for o in outcomes)}))
"""


def client_ceiling(args) -> int:
    """The raw part's ceiling: the APNs client alone against the fake (each in a process of its own)."""
    from tests.fakes.apns_server import FakeApnsServer

    fake = FakeApnsServer().start()
    try:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        result = subprocess.run([sys.executable, "-c", CLIENT_CODE, str(args.users), str(args.batch)],
                                env={**os.environ, **fake.env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                                capture_output=True, text=True, timeout=args.timeout)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        summary = {"bench": "push", "stage": "client", "users": args.users, "batch": args.batch,
                   **json.loads(result.stdout.strip().splitlines()[-1]),
                   "fake_cpu_ms_per_push": round(1000 * ((cpu1.ru_utime + cpu1.ru_stime)
                                                        - (cpu0.ru_utime + cpu0.ru_stime)) / (args.users + 10), 2),
                   "apns_connections": fake.connections_opened}
        summary["ok"] = summary["delivered"] == args.users
        print(json.dumps(summary), flush=True)
        return 0 if summary["ok"] else 1
    finally:
        fake.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000, help="offline users, one iOS push each (N)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="push worker processes (deploy/docker-compose.yml and systemd run 8)")
    parser.add_argument("--stage", choices=["deliver", "send", "client"], default="deliver",
                        help="queue deliver_push per planned row, or send_push per user (plan + deliver); "
                             "client: only ApnsClient.send_many in a process of its own, no database, no Celery")
    parser.add_argument("--batch", type=int, default=100, help="--stage client: notifications per send_many")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds of draining")
    parser.add_argument("--py-spy", dest="py_spy", metavar="FILE",
                        help="record the worker's processes with py-spy while they drain (collapsed stacks)")
    parser.add_argument("--badge-sync", dest="badge_sync", action="store_true",
                        help="three devices per user (iOS, Android, Web Push) and a read on a fourth after the "
                             "push: notifications and badge syncs mixed in one worker (implies --stage send)")
    parser.add_argument("--burst-users", dest="burst_users", type=int, default=10,
                        help="--badge-sync: users who read 100 times in a burst instead of once")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.users < 1 or args.concurrency < 1:
        parser.error("need --users >= 1 and --concurrency >= 1")

    if args.stage == "client":
        return client_ceiling(args)
    if args.badge_sync:
        return badge_sync_run(args)

    from tests.fakes.apns_server import FakeApnsServer
    from tests.harness import Worker, provision_embedded, provision_real, real_services_reachable

    from bench.baseline import interrupted

    signal.signal(signal.SIGTERM, interrupted)  # `kill` cleans up like Ctrl-C
    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-push-"))
    run_id = uuid.uuid4().hex[:10]
    services = provision_real(run_id) if kind == "real" else provision_embedded("bench-push", tmp)
    fake = FakeApnsServer().start()
    worker, ok, t_start = None, False, time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True)

    try:
        push_env = {**fake.env(), "PUSH_RETRY_BASE_SECONDS": "0.5", "PUSH_MAX_RETRIES": "5"}
        os.environ.update({k: v for k, v in services.env(**push_env).items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV", "JWT_SECRET")
                           or k.startswith(("APNS_", "PUSH_"))})
        from sqlalchemy import func, select

        from app.config import Settings
        from app.push.planning import PRIORITY_PRIVATE, plan_pushes
        from app.storage import Storage, upgrade_schema
        from models import PushLog

        upgrade_schema(services.database_url)
        storage = Storage(Settings.from_env())
        say(f"seeding {args.users} offline users with an iOS device and an unread message ({kind} services)...")
        users, tokens = seed(storage, f"push{run_id}-", args.users)

        from tasks.publish import DELIVER_PUSH, SEND_PUSH, queue_push_task

        if args.stage == "deliver":
            say(f"planning {args.users} pushes with app.push.planning.plan_pushes (push_log rows)...")
            plans = [plan for start in range(0, len(users), 500)
                     for plan in plan_pushes(storage, users[start:start + 500])]
            jobs = [(DELIVER_PUSH, [pid], plan.priority) for plan in plans for pid in plan.push_ids]  # as send_push
            if len(jobs) != args.users:
                raise SystemExit(f"planned {len(jobs)} pushes for {args.users} users: "
                                 f"{collections.Counter(p.skipped for p in plans)}")
        else:
            jobs = [(SEND_PUSH, ["0", str(uid), PRIORITY_PRIVATE], PRIORITY_PRIVATE) for uid in users]
        say(f"queueing {len(jobs)} {jobs[0][0].rsplit('.', 1)[-1]} tasks (confirmed publishes)...")
        for task, task_args, priority in jobs:  # deliver_push(push_id, attempt=0), as send_push queues it
            queue_push_task(task, task_args, priority, kwargs={"attempt": 0} if task == DELIVER_PUSH else None)

        # Watch the fake from before the worker starts: the first request starts the clock.
        seen = {"first": None, "last": None, "count": 0, "worker_cpu": None}
        stop_watch = threading.Event()

        def watch() -> None:
            while not stop_watch.is_set():
                count = len(fake.requests)
                now = time.monotonic()
                if count and seen["first"] is None:
                    seen["first"] = now
                    if worker is not None:
                        seen["worker_cpu"] = tree_cpu_seconds(worker.proc.pid)
                if count != seen["count"]:
                    seen["count"], seen["last"] = count, now
                stop_watch.wait(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        say(f"starting one push worker (--concurrency {args.concurrency}, logs in {tmp})...")
        worker = Worker("push", "push_tasks", services, tmp, concurrency=args.concurrency, **push_env)
        worker_ready = time.monotonic()
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                    str(worker.proc.pid), "--subprocesses", "--rate", "50", "--format", "raw",
                                    "--output", args.py_spy, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def successes() -> int:
            with storage.sessions() as session:
                return session.scalar(select(func.count()).select_from(PushLog)
                                      .where(PushLog.push_status == "success")) or 0

        deadline = time.monotonic() + args.timeout
        next_progress = time.monotonic() + PROGRESS_EVERY
        done = 0
        while time.monotonic() < deadline:
            done = successes()
            if done >= args.users:
                break
            if not worker.alive():
                raise SystemExit(f"the push worker exited:\n{worker.log_text()[-3000:]}")
            time.sleep(0.2)
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                elapsed = time.monotonic() - seen["first"] if seen["first"] else 0
                say(f"draining: {seen['count']} APNs requests, {done}/{args.users} push_log rows success"
                    + (f", {seen['count'] / elapsed:.0f}/s" if elapsed > 0 else ""))
        rows_done_at = time.monotonic()
        worker_cpu = tree_cpu_seconds(worker.proc.pid) - (seen["worker_cpu"] or 0.0)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # like Ctrl-C: py-spy writes what it sampled and exits
            spy.wait(60)
        stop_watch.set()
        watcher.join(2)

        # Exactly once, and nothing else.
        notes = fake.requests
        accepted = collections.Counter(r.token for r in notes if r.status == 200)
        refused = collections.Counter(r.reason for r in notes if r.status != 200)
        expected = set(tokens.values())
        missing = len(expected - set(accepted))
        duplicated = sum(n - 1 for n in accepted.values() if n > 1)
        unexpected = sum(n for t, n in accepted.items() if t not in expected)
        with storage.sessions() as session:
            statuses = dict(session.execute(select(PushLog.push_status, func.count()).group_by(PushLog.push_status))
                            .all())
            retried = session.scalar(select(func.count()).select_from(PushLog).where(PushLog.attempts > 1)) or 0
        first, last = seen["first"], seen["last"]
        span = (last - first) if first and last and last > first else None
        fake_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        summary = {
            "bench": "push", "services": kind, "users": args.users, "stage": args.stage,
            "concurrency": args.concurrency, "apns_requests": len(notes), "accepted": sum(accepted.values()),
            "refused": dict(refused), "pushes_per_second": round(len(notes) / span, 1) if span else None,
            "drain_seconds": round(span, 2) if span else None,
            "rows_success_seconds": round(rows_done_at - first, 2) if first else None,
            # From the worker being ready until every row is success: the whole drain, planning included
            # (in --stage send the first notification leaves only after the first batch was planned).
            "end_to_end_per_second": round(args.users / (rows_done_at - worker_ready), 1),
            "push_log": statuses, "retried": retried, "lost": missing, "duplicated": duplicated,
            "unexpected": unexpected, "apns_connections": fake.connections_opened,
            "bench_process_cpu_percent": round(100 * fake_cpu / span, 1) if span else None,  # mostly the APNs fake
            # The worker's processes from the first APNs request until every row was success: what one push
            # costs the worker, less sensitive than pushes/s to other load on the machine.
            "worker_cpu_ms_per_push": round(1000 * worker_cpu / args.users, 2) if seen["worker_cpu"] is not None
            else None,
            **worker_times(worker.log_text()),
        }
        if spy is not None:
            from bench.conns import spy_summary

            for share, name in spy_summary(args.py_spy, 30, ("deliver_push", "send_push", "asynloop")):
                print(f"  py-spy {share:5.1f} %  {name}", flush=True)
            summary["py_spy"] = args.py_spy
        ok = (missing == 0 and duplicated == 0 and unexpected == 0 and not refused and retried == 0
              and statuses.get("success", 0) == args.users and len(statuses) == 1)
        summary["ok"] = ok
        print(json.dumps(summary), flush=True)
        storage.dispose()
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        if worker is not None:
            worker.stop()
        fake.stop()
        close_run(services, tmp, ok, args.keep_logs)


def seed_three_devices(storage, prefix: str, count: int, webpush) -> tuple[list[int], dict]:
    """N users, each with an iOS, an Android and a Web Push device (a subscription at the fake) and
    one unread private message; the users and their devices ({platform: token})."""
    from sqlalchemy import insert

    from models import Device
    from tests.fakes.fcm_server import make_device_token

    users, ios = seed(storage, prefix, count)
    devices, rows = {}, []
    for uid in users:
        sub = webpush.new_subscription()
        devices[uid] = {"ios": ios[uid], "android": make_device_token(), "webpush": f"webpush:{sub.id}"}
        rows += [{"user_id": uid, "platform": "android", "token": devices[uid]["android"]},
                 {"user_id": uid, "platform": "webpush", "token": devices[uid]["webpush"],
                  "subscription": {"endpoint": sub.endpoint, "p256dh": sub.p256dh, "auth": sub.auth}}]
    with storage.session() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Device), rows[start:start + 5000])
    return users, devices


def badge_sync_run(args) -> int:
    """--badge-sync: notifications to three devices per user, and a read on a fourth mixed in."""
    from tests.fakes.apns_server import FakeApnsServer
    from tests.fakes.fcm_server import FakeFcmServer
    from tests.fakes.webpush_server import FakeWebPushServer
    from tests.harness import Worker, provision_embedded, provision_real, real_services_reachable

    from bench.baseline import interrupted

    signal.signal(signal.SIGTERM, interrupted)
    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-push-"))
    run_id = uuid.uuid4().hex[:10]
    services = provision_real(run_id) if kind == "real" else provision_embedded("bench-push", tmp)
    apns, fcm, webpush = FakeApnsServer().start(), FakeFcmServer().start(), FakeWebPushServer().start()
    worker, ok, t_start = None, False, time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True)

    try:
        credentials = fcm.write_service_account(tmp / "fcm.json")
        push_env = {**apns.env(), **webpush.env(), "FCM_BASE_URL": fcm.url, "FCM_CREDENTIALS_FILE": str(credentials),
                    "PUSH_RETRY_BASE_SECONDS": "0.5", "PUSH_MAX_RETRIES": "5"}
        os.environ.update({k: v for k, v in services.env(**push_env).items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV", "JWT_SECRET")
                           or k.startswith(("APNS_", "PUSH_", "FCM_", "VAPID_", "WEBPUSH_"))})
        from sqlalchemy import func, select, update

        from app.chat.unread import rebuild_unread
        from app.config import Settings
        from app.push.badges import SHOWN_KEY
        from app.push.planning import PRIORITY_PRIVATE
        from app.storage import Storage, upgrade_schema
        from models import STATUS_READ, Message, PushLog
        from tasks.publish import SEND_PUSH, queue_badge_syncs, queue_push_task

        upgrade_schema(services.database_url)
        storage = Storage(Settings.from_env())
        window = storage.settings.push_badge_coalesce_seconds
        say(f"seeding {args.users} offline users with iOS, Android and Web Push devices ({kind} services)...")
        users, devices = seed_three_devices(storage, f"push{run_id}-", args.users, webpush)
        with storage.sessions() as session:
            message_of = dict(session.execute(select(Message.receiver_id, Message.id)
                                              .where(Message.receiver_id.in_(users))).all())
        bursty = set(users[:max(0, min(args.burst_users, len(users)))])
        for uid in users:
            queue_push_task(SEND_PUSH, ["0", str(uid), PRIORITY_PRIVATE], PRIORITY_PRIVATE)
        times: list[float] = []
        stop = threading.Event()

        def watch() -> None:  # the first and last request any push service got
            seen = 0
            while not stop.is_set():
                count = len(apns.requests) + len(fcm.messages) + len(webpush.requests)
                if count != seen:
                    times.append(time.monotonic())
                    seen = count
                stop.wait(0.01)

        reads = {"users": 0, "calls": 0, "queued": 0}

        def read_when_pushed() -> None:
            """Each user reads on a fourth device once all three devices show the notification."""
            waiting = list(users)
            while waiting and not stop.is_set():
                pipe = storage.redis.pipeline(transaction=False)
                for uid in waiting:
                    pipe.hlen(SHOWN_KEY.format(uid))
                shown = [uid for uid, n in zip(waiting, pipe.execute()) if n >= 6]  # 3 devices x (conv + badge)
                for uid in shown:
                    with storage.session() as session:  # what mark_read changes, for this message
                        session.execute(update(Message).where(Message.id == message_of[uid]).values(status=STATUS_READ))
                    rebuild_unread(storage, [uid])
                    for _ in range(100 if uid in bursty else 1):
                        reads["queued"] += len(queue_badge_syncs(storage, [uid], message_of[uid]))
                        reads["calls"] += 1
                    reads["users"] += 1
                waiting = [uid for uid in waiting if uid not in set(shown)]
                stop.wait(0.05)

        watcher, reader = threading.Thread(target=watch, daemon=True), threading.Thread(target=read_when_pushed,
                                                                                         daemon=True)
        watcher.start()
        say(f"starting one push worker (--concurrency {args.concurrency}, logs in {tmp})...")
        worker = Worker("push", "push_tasks", services, tmp, concurrency=args.concurrency, **push_env)
        worker_ready = time.monotonic()
        reader.start()
        expected = 3 * len(users) * 2  # a notification and a badge sync per device

        def rows_done() -> int:
            with storage.sessions() as session:
                return session.scalar(select(func.count()).select_from(PushLog)
                                      .where(PushLog.push_status == "success")) or 0

        deadline, next_progress, done = time.monotonic() + args.timeout, time.monotonic() + PROGRESS_EVERY, 0
        while time.monotonic() < deadline:
            done = rows_done()
            if done >= expected:
                break
            if not worker.alive():
                raise SystemExit(f"the push worker exited:\n{worker.log_text()[-3000:]}")
            time.sleep(0.2)
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                say(f"draining: {done}/{expected} push_log rows success, {reads['users']} users read")
        finished = time.monotonic()
        time.sleep(window + 1.0)  # a second window, had any read opened one, would have sent by now
        stop.set()
        watcher.join(2)
        reader.join(2)

        silent = collections.Counter()
        alerts = collections.Counter()
        for r in apns.requests:
            if r.status == 200:
                (silent if r.headers.get("apns-push-type") == "background" else alerts)[r.token] += 1
        for m in fcm.messages:
            (silent if m.get("data", {}).get("kind") == "badge_sync" else alerts)[m["token"]] += 1
        for d in webpush.deliveries:
            (silent if d.payload.get("kind") == "badge_sync" else alerts)[f"webpush:{d.subscription_id}"] += 1
        all_devices = [t for per_user in devices.values() for t in per_user.values()]
        burst_devices = [t for uid in bursty for t in devices[uid].values()]
        with storage.sessions() as session:
            statuses = dict(session.execute(select(PushLog.push_status, func.count()).group_by(PushLog.push_status))
                            .all())
        span = times[-1] - times[0] if len(times) > 1 else None
        total = sum(alerts.values()) + sum(silent.values())
        summary = {
            "bench": "push", "mode": "badge-sync", "services": kind, "users": args.users, "devices": len(all_devices),
            "concurrency": args.concurrency, "coalesce_window_s": window, "burst_users": len(bursty),
            "reads": reads["calls"], "badge_syncs_queued": reads["queued"],
            "notifications": sum(alerts.values()), "silent_pushes": sum(silent.values()),
            "pushes_per_second": round(total / span, 1) if span else None,
            "end_to_end_per_second": round(total / (finished - worker_ready), 1),
            "max_silent_per_device": max((silent[t] for t in all_devices), default=0),
            "max_silent_per_burst_device": max((silent[t] for t in burst_devices), default=0),
            "push_log": statuses, **worker_times(worker.log_text()),
        }
        ok = (all(alerts[t] == 1 for t in all_devices) and all(silent[t] == 1 for t in all_devices)
              and reads["queued"] == len(users) and statuses.get("success", 0) == expected and len(statuses) == 1)
        summary["ok"] = ok
        print(json.dumps(summary), flush=True)
        storage.dispose()
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        if worker is not None:
            worker.stop()
        for fake in (apns, fcm, webpush):
            fake.stop()
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
