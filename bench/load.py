"""End-to-end message load: `python -m bench.load --users 20 --gateways 2 --rate 200 --seconds 20`.

Provisions its own database, vhost and Redis db (like the tests: real services
when they answer on 127.0.0.1, else embedded), starts M gateways, one persist
worker (private_messages,group_messages), one dispatch worker
(offline_messages) and one push worker (push_tasks), registers N users and
connects each once (round-robin over the gateways). User i sends to user
i+1 (mod N), so every user sends and receives and, with 2+ gateways, every
message crosses gateways.

Senders send at the total rate R (--rate; 0 = as fast as possible) for D
seconds (--seconds), never more than --max-inflight unanswered sends per
connection. Each message has a unique client_msg_id and its wall-clock send
time in `extra`. One reader thread per connection records acks (ack latency =
ack received - sent) and live `message` frames (delivery latency = received -
sent). After the send phase it waits (--drain-timeout) until every acked
message was delivered live, then syncs recipients' streams from null over
fresh connections (all users, or with --verify-sync missing only those that
missed live frames) and counts the storage in the database.

Redis starts empty, as on a new deployment (the run's own db; nothing is
backdated or pre-seeded), so the first seconds are the risk window after a
Redis loss (app/chat/recovery.py). `--flush-redis-at SECONDS` flushes the
run's Redis db that long after the send phase began, as a Redis restart or
failover would. Throughput (messages delivered live per second, by delivery
time) and ack p99 (by send time) are shown per 5-second window while it runs
and in the summary, with phases compared to the warm one: `new_deployment`
(the first --phase-seconds), `warm` (from then to 5 s before the flush, or to
the end, and from the end of `after_flush` to the end), `after_flush` (the 5 s
before the flush, whose sends' acks may come after it, and the --phase-seconds
after it).

`--mix FRACTION` adds edits and reactions to the load: after each send, with
that probability, the sender also edits one of its messages already delivered
(odd sends) or adds or removes a 👍/🎉 on the latest message it received (even
sends); the summary counts them (`mix_sent`, `mix_frames`: the `edited` and
`reaction` frames received, `mix_errors`), so sends with and without a mix
can be compared (docs/benchmarks.md).

Prints a progress line every 5 s and ends with a one-line JSON summary. Exit
status 1 when a message was lost (acked, but neither delivered live nor in
the recipient's sync stream), duplicated (twice in a sync stream, or stored
twice), or missing from a synced stream; 2 when nothing was acked.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import websocket

from tests.harness import (
    Gateway, Worker, provision_embedded, provision_real, real_services_reachable, register_and_login,
)

PROGRESS_EVERY = 5.0
PING_EVERY = 20.0
ACK_WAIT_SECONDS = 15.0
MAX_MESSAGES = 1_000_000
SYNC_PAGE = 500


class Record:
    """One message of the run, from its send to its delivery."""

    __slots__ = ("cmid", "sender", "recipient", "sent_at", "ack_at", "msg_id", "error", "delivered_at",
                 "live_copies", "live_msg_id", "delivery_latency")

    def __init__(self, cmid: str, sender: int, recipient: int, sent_at: float):
        self.cmid, self.sender, self.recipient, self.sent_at = cmid, sender, recipient, sent_at
        self.ack_at = self.msg_id = self.error = self.delivered_at = self.live_msg_id = None
        self.delivery_latency = None
        self.live_copies = 0


class Run:
    """State shared by the sender and reader threads."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.records: dict[str, Record] = {}
        self.lock = threading.Lock()
        self.sent = self.acked = self.delivered = 0
        self.errors: Counter = Counter()
        self.stop_sending = threading.Event()
        self.stop_reading = threading.Event()
        self.last_ack_at = self.last_delivery_at = 0.0
        self.misrouted = 0
        self.foreign_frames = 0
        self.unexpected: Counter = Counter()
        # --mix: edits and reactions sent between the sends, and the frames they caused.
        self.mix_sent: Counter = Counter()
        self.mix_frames: Counter = Counter()
        self.mix_errors: Counter = Counter()


class Conn:
    """One user's connection: a reader thread, a sender thread, a send lock."""

    def __init__(self, run: Run, index: int, user, gateway, peer: int, peer_user_id: str, max_inflight: int,
                 mix: float = 0.0, confirm: bool = True):
        self.run, self.index, self.user, self.gateway, self.peer = run, index, user, gateway, peer
        self.mix, self.random = mix, random.Random(index)
        # As the web client: `received` for what arrived, one frame per conversation per second.
        self.confirm, self.to_confirm, self.confirmed_at = confirm, {}, 0.0
        self.received: list[str] = []  # msg_ids delivered to this user live: what it may react to
        self.peer_user_id = peer_user_id
        self.ws = websocket.create_connection(f"{gateway.ws}?token={user.token}", timeout=10)
        hello = json.loads(self.ws.recv())
        if hello.get("type") != "hello":
            raise RuntimeError(f"first frame was not hello: {hello}")
        self.send_lock = threading.Lock()
        self.inflight = threading.BoundedSemaphore(max_inflight)
        self.max_inflight = max_inflight
        self.closed: str | None = None  # why the reader stopped early
        self.reader = threading.Thread(target=self._read_loop, name=f"reader-{index}", daemon=True)
        self.sender: threading.Thread | None = None
        self.reader.start()

    # -- sending
    def send_frame(self, frame: dict) -> None:
        data = json.dumps(frame)
        with self.send_lock:
            self.ws.send(data)

    def send_one(self, seq: int) -> bool:
        run = self.run
        cmid = f"{run.prefix}{self.index}-{seq}"
        now = time.time()
        rec = Record(cmid, self.index, self.peer, now)
        with run.lock:
            run.records[cmid] = rec
            run.sent += 1
        try:
            self.send_frame({"type": "send", "client_msg_id": cmid, "to": self.peer_user_id,
                             "content": f"load message {seq} from user {self.index}",
                             "extra": {"bench_sent_at": now}})
            return True
        except Exception as exc:  # connection gone: not sent after all
            with run.lock:
                run.sent -= 1
                del run.records[cmid]
            self.inflight.release()
            self.closed = self.closed or f"send failed: {exc!r}"
            return False

    def send_loop(self, t0: float, deadline: float, interval: float | None, offset: float, budget: int) -> None:
        """interval=None: as fast as the in-flight bound allows; else one send every `interval` s."""
        run, seq, next_at = self.run, 0, t0 + offset
        while seq < budget and not run.stop_sending.is_set() and self.closed is None:
            if interval is not None:
                delay = next_at - time.monotonic()
                if delay > 0:
                    if run.stop_sending.wait(delay):
                        break
                next_at += interval
            if time.monotonic() >= deadline:
                break
            while not self.inflight.acquire(timeout=0.2):
                if run.stop_sending.is_set() or time.monotonic() >= deadline or self.closed is not None:
                    return
            if not self.send_one(seq):
                return
            seq += 1
            if self.mix and self.random.random() < self.mix:
                self.send_mixed(seq)

    def send_mixed(self, seq: int) -> None:
        """An edit of one of this user's delivered messages, or a reaction to one it received
        (delivered ones only: stored, so the gateway never waits for them)."""
        run = self.run
        if seq % 2:
            with run.lock:
                mine = [r for r in list(run.records.values())[-200:] if r.sender == self.index and r.delivered_at]
            if not mine:
                return
            frame = {"type": "edit", "msg_id": mine[-1].msg_id, "content": f"edited {seq} by user {self.index}"}
        elif self.received:
            frame = {"type": "react", "msg_id": self.received[-1], "emoji": "👍🎉"[seq // 2 % 2],
                     "op": self.random.choice(["add", "remove"])}
        else:
            return
        try:
            self.send_frame(frame)
            with run.lock:
                run.mix_sent[frame["type"]] += 1
        except Exception as exc:
            self.closed = self.closed or f"send failed: {exc!r}"

    # -- receiving
    def _read_loop(self) -> None:
        self.ws.settimeout(0.5)
        run = self.run
        while not run.stop_reading.is_set():
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                self._confirm_received(time.time())
                continue
            except Exception as exc:
                if not run.stop_reading.is_set():
                    self.closed = self.closed or f"receive failed: {exc!r}"
                return
            now = time.time()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                self.closed = f"closed by server: {code} {data[2:].decode(errors='replace')}"
                return
            try:
                frame = json.loads(data)
            except ValueError:
                run.unexpected["non-json"] += 1
                continue
            self._handle(frame, now)
            self._confirm_received(now)

    def _confirm_received(self, now: float) -> None:
        if not self.to_confirm or now - self.confirmed_at < CONFIRM_EVERY:
            return
        pending, self.to_confirm, self.confirmed_at = self.to_confirm, {}, now
        try:
            for conversation_id, msg_id in pending.items():
                self.send_frame({"type": "received", "conversation_id": conversation_id, "msg_id": str(msg_id)})
        except Exception as exc:
            self.closed = self.closed or f"send failed: {exc!r}"
            return
        with self.run.lock:
            self.run.mix_sent["received"] += len(pending)

    def _handle(self, frame: dict, now: float) -> None:
        run, kind = self.run, frame.get("type")
        if kind == "error" and not frame.get("client_msg_id"):  # an edit or react refused (--mix)
            with run.lock:
                run.mix_errors[frame.get("code", "?")] += 1
            return
        if kind in ("edited", "reaction", "receipt"):
            with run.lock:
                run.mix_frames[kind] += 1
            return
        if kind in ("ack", "error"):
            rec = run.records.get(frame.get("client_msg_id") or "")
            if rec is None or rec.sender != self.index:
                run.unexpected[f"{kind}:{frame.get('code', '')}"] += 1
                return
            if rec.ack_at is not None or rec.error is not None:
                run.unexpected[f"second answer:{kind}"] += 1
                return
            with run.lock:
                if kind == "ack":
                    rec.ack_at, rec.msg_id = now, frame["msg_id"]
                    run.acked += 1
                    run.last_ack_at = max(run.last_ack_at, now)
                else:
                    rec.error = frame.get("code", "?")
                    run.errors[rec.error] += 1
            self.inflight.release()
        elif kind == "message":
            rec = run.records.get(frame.get("client_msg_id") or "")
            if rec is None:
                run.foreign_frames += 1
                return
            if rec.recipient != self.index:
                run.misrouted += 1
                return
            with run.lock:
                rec.live_copies += 1
                if rec.live_copies == 1:
                    # Latency from the send time the message carries in `extra`.
                    sent_at = (frame.get("extra") or {}).get("bench_sent_at", rec.sent_at)
                    rec.delivered_at, rec.live_msg_id, rec.delivery_latency = now, frame.get("msg_id"), now - sent_at
                    run.delivered += 1
                    if self.mix:
                        self.received = self.received[-20:] + [frame.get("msg_id")]
                    if self.confirm and frame.get("msg_id"):
                        cid, mid = frame["conversation_id"], int(frame["msg_id"])
                        self.to_confirm[cid] = max(mid, self.to_confirm.get(cid, 0))
                    run.last_delivery_at = max(run.last_delivery_at, now)
        elif kind == "pong":
            pass
        else:
            run.unexpected[str(kind)] += 1

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))  # nearest rank
    return values[k]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def sync_stream(gateway, token: str, deadline: float) -> tuple[list[dict], int]:
    """Page through a user's whole stream from null on a fresh connection: (message entries, pages)."""
    ws = websocket.create_connection(f"{gateway.ws}?token={token}", timeout=30)
    try:
        json.loads(ws.recv())  # hello
        entries, cursor, pages = [], None, 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("sync did not finish in time")
            ws.send(json.dumps({"type": "sync", "cursor": cursor, "limit": SYNC_PAGE}))
            while True:
                frame = json.loads(ws.recv())
                if frame.get("type") == "sync_batch":
                    break
                if frame.get("type") == "error":
                    raise RuntimeError(f"sync error: {frame}")
            pages += 1
            entries += [e for e in frame["messages"] if e.get("type") == "message"]
            cursor = frame["cursor"]
            if not frame["has_more"]:
                return entries, pages
    finally:
        ws.close()


def db_counts(database_url: str, prefix: str) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as c:
            rows, distinct = c.execute(text(
                "SELECT COUNT(*), COUNT(DISTINCT client_msg_id) FROM message WHERE client_msg_id LIKE :p"),
                {"p": prefix + "%"}).one()
            dup_entries = c.execute(text(
                "SELECT COUNT(*) FROM (SELECT user_id, message_id, kind, ref_id, COUNT(*) AS n FROM sync_entry "
                "GROUP BY user_id, message_id, kind, ref_id HAVING COUNT(*) > 1) d")).scalar()
            cmids = {r[0] for r in c.execute(text(
                "SELECT client_msg_id FROM message WHERE client_msg_id LIKE :p"), {"p": prefix + "%"})}
        return {"rows": int(rows), "distinct": int(distinct), "dup_sync_entries": int(dup_entries), "cmids": cmids}
    finally:
        engine.dispose()


def queue_depths(services) -> dict | None:
    """Ready + unacked messages per non-empty queue of the run's RabbitMQ vhost (None on other brokers)."""
    if not services.broker_url.startswith("amqp"):
        return None
    vhost = services.broker_url.rsplit("/", 1)[-1]
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name",
                              "messages"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"could not read the queue depths: {exc!r}", flush=True)
        return None
    depths = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]):
            depths[parts[0]] = int(parts[1])
    return depths


WINDOW = 5.0
CONFIRM_EVERY = 1.0  # s: a recipient's `received` frames, at most one per conversation this often (as netherlink.js)


def _latencies(records, sent_in) -> dict:
    """Ack and send-to-live-delivery latency (p50, p99, p99.9) of the messages sent when `sent_in(t)` holds."""
    picked = [r for r in records if sent_in(r.sent_at)]
    acks = [r.ack_at - r.sent_at for r in picked if r.ack_at is not None]
    delivered = [r.delivery_latency for r in picked if r.delivery_latency is not None]
    out = {"acked": len(acks)}
    for name, values in (("ack", acks), ("deliver", delivered)):
        for p in (50, 99, 99.9):
            out[f"{name}_ms_p{str(p).replace('.', '')}"] = ms(percentile(values, p))
    return out


def _window(records, wall0: float, start: float, end: float) -> dict:
    """Messages delivered live in [start, end) s after wall0, per second; ack and delivery latency of those sent then."""
    delivered = sum(1 for r in records if r.delivered_at is not None and start <= r.delivered_at - wall0 < end)
    return {"start": round(start, 1), "seconds": round(end - start, 1),
            "delivered_per_second": round(delivered / max(end - start, 1e-9), 1),
            **_latencies(records, lambda sent: start <= sent - wall0 < end)}


def window_line(run: Run, wall0: float, index: int) -> None:
    """The 5 s window that just ended, while the run goes on."""
    if index < 0:
        return
    with run.lock:
        records = list(run.records.values())
    w = _window(records, wall0, index * WINDOW, (index + 1) * WINDOW)
    print(f"         window {w['start']:.0f}-{w['start'] + WINDOW:.0f} s: {w['delivered_per_second']} msg/s "
          f"delivered, ack p99 {w['ack_ms_p99']} ms, delivery p99 {w['deliver_ms_p99']} ms "
          "(acks and deliveries still coming in count later)", flush=True)


def window_stats(records, wall0: float, seconds: float) -> list[dict]:
    return [_window(records, wall0, i * WINDOW, (i + 1) * WINDOW) for i in range(int(math.ceil(seconds / WINDOW)))]


def phase_stats(records, wall0: float, seconds: float, phase: float, flushed_at: float | None) -> dict:
    """new_deployment, warm and after_flush phases, and each one's ratios to warm."""
    first = min(phase, seconds, flushed_at if flushed_at is not None else seconds)
    phases = {"new_deployment": _window(records, wall0, 0, first)}
    # The sends of the window before the flush belong to it: their acks may come after the loss.
    warm = [(first, flushed_at - WINDOW if flushed_at is not None else seconds)]
    if flushed_at is not None:
        phases["after_flush"] = _window(records, wall0, flushed_at - WINDOW, min(flushed_at + phase, seconds))
        warm.append((flushed_at + phase, seconds))
    warm = [(a, b) for a, b in warm if b - a >= WINDOW]
    if warm:  # the rest of the run: after the first phase, and after the flush's phase
        parts = [_window(records, wall0, a, b) for a, b in warm]
        delivered = sum(p["delivered_per_second"] * p["seconds"] for p in parts)
        span = sum(b - a for a, b in warm)
        phases["warm"] = {"spans": [[round(a, 1), round(b, 1)] for a, b in warm], "seconds": round(span, 1),
                          "delivered_per_second": round(delivered / span, 1),
                          **_latencies(records, lambda sent: any(a <= sent - wall0 < b for a, b in warm))}
    warm = phases.get("warm")
    if warm and warm["delivered_per_second"] and warm["ack_ms_p99"]:
        for name in ("new_deployment", "after_flush"):
            if name in phases and phases[name]["ack_ms_p99"] is not None:
                phases[name]["throughput_vs_warm"] = round(
                    phases[name]["delivered_per_second"] / warm["delivered_per_second"], 3)
                phases[name]["ack_p99_vs_warm"] = round(phases[name]["ack_ms_p99"] / warm["ack_ms_p99"], 3)
    return phases


def progress(run: Run, t0: float, phase: str) -> None:
    with run.lock:
        sent, acked, delivered, errors = run.sent, run.acked, run.delivered, sum(run.errors.values())
    print(f"[{time.monotonic() - t0:6.1f}s] {phase}: sent={sent} acked={acked} delivered={delivered} "
          f"errors={errors} in_flight={sent - acked - errors}", flush=True)


def keepalive(conns: list[Conn]) -> None:
    for conn in conns:
        if conn.closed is None:
            try:
                conn.send_frame({"type": "ping"})
            except Exception:
                pass


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def component_cpu(procs) -> dict[str, float]:
    """CPU seconds used so far by each component's process tree ("gateways" summed) and this bench."""
    totals: dict[str, float] = {}
    for proc in procs:
        name = "gateways" if proc.name.startswith("gateway") or proc.name.startswith("gw") else proc.name
        totals[name] = totals.get(name, 0.0) + sum(_cpu_seconds(pid) for pid in _tree_pids(proc.proc.pid))
    totals["bench_client"] = _cpu_seconds(os.getpid())
    # The services serve everyone on the machine: their share is this run's only when nothing else runs.
    for name, comm in (("mariadb", "mariadbd"), ("rabbitmq", "beam.smp"), ("redis", "redis-server")):
        totals[name] = sum(_cpu_seconds(pid) for pid in _pids_named(comm))
    return totals


def profile_components(run: Run, procs, args) -> None:
    """py-spy on each component's process tree in the warm phase: where its CPU goes (docs/benchmarks.md)."""
    if run.stop_sending.wait(min(args.phase_seconds, max(0.0, args.seconds - args.py_spy_seconds))):
        return
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.proc.pid),
                               "--subprocesses", "--duration", str(max(1, int(args.py_spy_seconds))), "--rate", "100",
                               "--format", "raw", "--nonblocking", "--output", str(out / f"{proc.name}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for proc in procs]
    print(f"py-spy: recording {len(spies)} components for {args.py_spy_seconds:g} s into {out}", flush=True)
    for spy in spies:
        spy.wait()


def _pids_named(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == comm:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200, help="total messages/s; 0 = as fast as possible")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--persist-concurrency", type=int, default=2)
    parser.add_argument("--dispatch-concurrency", type=int, default=2)
    parser.add_argument("--max-inflight", type=int, default=16, help="unanswered sends per connection")
    parser.add_argument("--drain-timeout", type=float, default=60,
                        help="at most this many seconds to wait for live delivery after the send phase")
    parser.add_argument("--stall-timeout", type=float, default=20,
                        help="stop waiting for live delivery earlier when nothing arrived for this long")
    parser.add_argument("--verify-sync", choices=["all", "missing"], default="all",
                        help="sync every user's stream from null, or only recipients that missed live frames")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs even when the run passes")
    parser.add_argument("--flush-redis-at", type=float, default=None, metavar="SECONDS",
                        help="flush the run's Redis db this many seconds into the send phase (a Redis restart)")
    parser.add_argument("--phase-seconds", type=float, default=30,
                        help="length of the new_deployment and after_flush phases compared to warm (default 30)")
    parser.add_argument("--no-confirm", action="store_true",
                        help="recipients send no `received` frames (an old client): every live message is then "
                             "settled as unconfirmed after LIVE_CONFIRM_SECONDS")
    parser.add_argument("--mix", type=float, default=0.0, metavar="FRACTION",
                        help="after each send, with this probability, also an edit of one of the user's delivered "
                             "messages or a reaction (add/remove) to one it received (docs/benchmarks.md)")
    parser.add_argument("--py-spy", dest="py_spy", metavar="DIR",
                        help="record every component's processes with py-spy (collapsed stacks, one file per "
                             "component in DIR) for --py-spy-seconds from the end of the first --phase-seconds")
    parser.add_argument("--py-spy-seconds", type=float, default=20)
    args = parser.parse_args()
    if args.users < 2 or args.gateways < 1 or args.seconds <= 0 or args.rate < 0 or args.max_inflight < 1:
        parser.error("need --users >= 2, --gateways >= 1, --seconds > 0, --rate >= 0, --max-inflight >= 1")
    if args.rate and args.rate * args.seconds > MAX_MESSAGES:
        parser.error(f"at most {MAX_MESSAGES} messages per run")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)

    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-load-"))
    run_id = uuid.uuid4().hex[:10]
    services = provision_real(run_id) if kind == "real" else provision_embedded("bench-load", tmp)
    procs: list = []
    conns: list[Conn] = []
    ok = False
    try:
        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV")})
        from app.storage import upgrade_schema

        upgrade_schema(services.database_url)
        import redis as redis_client

        redis_db = redis_client.Redis.from_url(services.redis_url)
        print(f"starting {args.gateways} gateway(s) and 3 workers ({kind} services, logs in {tmp})...", flush=True)
        gateways = []
        for i in range(args.gateways):
            gateways.append(Gateway(f"gw{i + 1}", services, tmp))
            procs.append(gateways[-1])
        procs.append(Worker("persist", "private_messages,group_messages", services, tmp,
                            concurrency=args.persist_concurrency))
        procs.append(Worker("dispatch", "offline_messages", services, tmp, concurrency=args.dispatch_concurrency))
        procs.append(Worker("push", "push_tasks", services, tmp, concurrency=1))

        print(f"registering {args.users} users...", flush=True)
        with ThreadPoolExecutor(max_workers=min(8, args.users)) as pool:
            users = list(pool.map(lambda i: register_and_login(gateways[i % len(gateways)].http),
                                  range(args.users)))

        run = Run(f"bl{run_id}-")
        for i, user in enumerate(users):
            peer = (i + 1) % args.users
            conns.append(Conn(run, i, user, gateways[i % len(gateways)], peer, users[peer].user_id,
                              args.max_inflight, args.mix, confirm=not args.no_confirm))
        print(f"{len(conns)} connections open; sending for {args.seconds:g} s at "
              f"{'max rate' if not args.rate else f'{args.rate:g} msg/s'}...", flush=True)

        # Send phase. CPU is counted from here to the end of live delivery, per component.
        cpu_before = component_cpu(procs)
        n = args.users
        budget = int(args.rate * args.seconds / n) + 1 if args.rate else MAX_MESSAGES // n
        interval = n / args.rate if args.rate else None
        t0 = time.monotonic()
        wall0 = time.time()
        deadline = t0 + args.seconds
        for conn in conns:
            offset = (conn.index / args.rate) if args.rate else 0.0
            conn.sender = threading.Thread(target=conn.send_loop, args=(t0, deadline, interval, offset, budget),
                                           name=f"sender-{conn.index}", daemon=True)
            conn.sender.start()
        next_progress, next_ping = t0 + PROGRESS_EVERY, t0 + PING_EVERY
        flushed_at = None
        if args.flush_redis_at is not None:
            def flush_redis() -> None:
                nonlocal flushed_at
                if not run.stop_sending.wait(args.flush_redis_at):
                    claim = redis_db.get("nl:test:claimed-by")  # (tests.harness.claim_redis_db)
                    # The run's own db (the machine's Redis serves others too), keeping its claim on it.
                    redis_db.pipeline(transaction=True).flushdb().set("nl:test:claimed-by", claim or "bench",
                                                                      ex=6 * 3600).execute()
                    flushed_at = time.time() - wall0
                    print(f"[{time.monotonic() - t0:6.1f}s] Redis flushed (FLUSHDB of the run's db)", flush=True)

            threading.Thread(target=flush_redis, name="flush-redis", daemon=True).start()

        if args.py_spy:
            threading.Thread(target=profile_components, args=(run, procs, args), name="py-spy", daemon=True).start()

        def tick(phase: str) -> None:
            nonlocal next_progress, next_ping
            now = time.monotonic()
            if now >= next_progress:
                progress(run, t0, phase)
                window_line(run, wall0, int((now - t0) // WINDOW) - 1)
                next_progress += PROGRESS_EVERY
            if now >= next_ping:
                keepalive(conns)
                next_ping += PING_EVERY

        while time.monotonic() < deadline and any(c.sender.is_alive() for c in conns):
            time.sleep(0.1)
            tick("sending")
        run.stop_sending.set()
        for conn in conns:
            conn.sender.join(timeout=5)
        send_end = time.time()

        # Wait for outstanding answers, then for live delivery of everything acked.
        ack_deadline = time.monotonic() + ACK_WAIT_SECONDS
        while time.monotonic() < ack_deadline:
            with run.lock:
                if run.sent == run.acked + sum(run.errors.values()):
                    break
            time.sleep(0.05)
            tick("waiting for acks")
        drain_deadline = time.monotonic() + args.drain_timeout
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < drain_deadline and time.monotonic() - last_change < args.stall_timeout:
            with run.lock:
                if run.delivered >= run.acked and all(r.delivered_at for r in run.records.values() if r.ack_at):
                    break
                if run.delivered != last_count:
                    last_count, last_change = run.delivered, time.monotonic()
            time.sleep(0.1)
            tick("waiting for delivery")
        progress(run, t0, "live phase done")
        cpu_used = {name: round(seconds - cpu_before.get(name, 0.0), 2) for name, seconds in component_cpu(procs).items()}
        queued_at_end = queue_depths(services)
        if queued_at_end:
            # Acked but still queued is late, not lost: let the workers store it before syncing.
            print(f"messages still in the broker's queues: {queued_at_end}; waiting for them to drain "
                  f"(at most {args.drain_timeout:g} s) before syncing", flush=True)
            queue_deadline = time.monotonic() + args.drain_timeout
            pipeline = ("private_messages", "group_messages", "offline_messages")
            depths = {q: d for q, d in queued_at_end.items() if q in pipeline}
            while depths and time.monotonic() < queue_deadline:
                time.sleep(2)
                tick("waiting for the queues")
                depths = {q: d for q, d in (queue_depths(services) or {}).items() if q in pipeline}
            if depths:
                print(f"queues not drained: {depths}", flush=True)
        run.stop_reading.set()
        for conn in conns:
            conn.reader.join(timeout=2)
            conn.close()
        closed = {c.index: c.closed for c in conns if c.closed}

        records = list(run.records.values())
        acked = [r for r in records if r.ack_at is not None]
        unanswered = [r for r in records if r.ack_at is None and r.error is None]
        live = [r for r in acked if r.delivered_at is not None]
        missed_live = [r for r in acked if r.delivered_at is None]
        live_dups = sum(1 for r in records if r.live_copies > 1)
        msgid_mismatch = sum(1 for r in live if r.live_msg_id != r.msg_id)

        # Sync verification on fresh connections.
        if args.verify_sync == "all":
            to_sync = list(range(n))
        else:
            to_sync = sorted({r.recipient for r in missed_live})
        print(f"syncing {len(to_sync)} stream(s) from null...", flush=True)
        sync_deadline = time.monotonic() + 120
        streams: dict[int, list[dict]] = {}
        sync_failures: dict[int, str] = {}
        t_sync = time.monotonic()

        def do_sync(i: int):
            try:
                streams[i], _ = sync_stream(gateways[i % len(gateways)], users[i].token, sync_deadline)
            except Exception as exc:
                sync_failures[i] = repr(exc)

        with ThreadPoolExecutor(max_workers=min(8, max(1, len(to_sync)))) as pool:
            list(pool.map(do_sync, to_sync))
        sync_seconds = time.monotonic() - t_sync
        stream_cmids: dict[int, set[str]] = {}
        dup_in_sync = 0
        for i, entries in streams.items():
            ids = [e["msg_id"] for e in entries if e["type"] == "message"]  # (edits and reactions name theirs again)
            dup_in_sync += len(ids) - len(set(ids))
            stream_cmids[i] = {e.get("client_msg_id") for e in entries}  # unique per run: sender index inside
        delivered_by_sync = lost = 0
        lost_examples = []
        for r in missed_live:
            if r.cmid in stream_cmids.get(r.recipient, ()):
                delivered_by_sync += 1
            else:
                lost += 1
                if len(lost_examples) < 5:
                    lost_examples.append({"client_msg_id": r.cmid, "msg_id": r.msg_id,
                                          "recipient_synced": r.recipient in streams})
        # Gap check on the streams we read: every acked message in the recipient's and the sender's stream.
        missing_recipient = sum(1 for r in acked if r.recipient in streams and r.cmid not in stream_cmids[r.recipient])
        missing_sender = sum(1 for r in acked if r.sender in streams and r.cmid not in stream_cmids[r.sender])

        counts = db_counts(services.database_url, run.prefix)
        stored_twice = counts["rows"] - counts["distinct"]
        acked_cmids = {r.cmid for r in acked}
        stored_not_acked = len(counts["cmids"] - acked_cmids)
        acked_not_stored = len(acked_cmids - counts["cmids"])
        duplicated = dup_in_sync + stored_twice + counts["dup_sync_entries"]

        send_seconds = send_end - wall0
        ack_lat = [r.ack_at - r.sent_at for r in acked]
        del_lat = [r.delivery_latency for r in live]
        ack_span = max(run.last_ack_at - wall0, 1e-9)
        del_span = max(run.last_delivery_at - wall0, 1e-9)
        windows = window_stats(records, wall0, send_seconds)
        phases = phase_stats(records, wall0, send_seconds, args.phase_seconds, flushed_at)
        print("per 5 s window (start s: delivered msg/s, ack p50/p99/p99.9 ms, delivery p50/p99/p99.9 ms):", flush=True)
        for w in windows:
            print(f"  {w['start']:5.0f}: {w['delivered_per_second']:7.1f}  "
                  f"{w['ack_ms_p50']}/{w['ack_ms_p99']}/{w['ack_ms_p999']}  "
                  f"{w['deliver_ms_p50']}/{w['deliver_ms_p99']}/{w['deliver_ms_p999']}", flush=True)
        summary = {
            "bench": "load", "flushed_redis_at": None if flushed_at is None else round(flushed_at, 2),
            "phases": phases, "windows": windows, "services": kind, "users": n, "gateways": args.gateways, "rate_target": args.rate,
            "seconds": args.seconds, "max_inflight": args.max_inflight,
            "persist_concurrency": args.persist_concurrency, "dispatch_concurrency": args.dispatch_concurrency,
            "sent": len(records), "acked": len(acked), "errors": dict(run.errors), "unanswered": len(unanswered),
            "send_rate": round(len(records) / send_seconds, 1),
            "acked_per_second": round(len(acked) / ack_span, 1) if acked else 0,
            "delivered_live": len(live),
            "delivered_per_second": round(len(live) / del_span, 1) if live else 0,
            "ack_ms_p50": ms(percentile(ack_lat, 50)), "ack_ms_p99": ms(percentile(ack_lat, 99)),
            "deliver_ms_p50": ms(percentile(del_lat, 50)), "deliver_ms_p99": ms(percentile(del_lat, 99)),
            "deliver_ms_max": ms(max(del_lat) if del_lat else None),
            # CPU per delivered message, by component (every process of it, over the live phase):
            # holds on a shared machine, where rates do not.
            "cpu_ms_per_message": {name: round(1000 * seconds / max(len(live), 1), 3)
                                   for name, seconds in cpu_used.items()},
            "delivered_by_sync": delivered_by_sync, "lost": lost, "duplicated": duplicated,
            "stored_rows": counts["rows"], "stored_twice": stored_twice, "dup_in_sync": dup_in_sync,
            "stored_not_acked": stored_not_acked, "acked_not_stored": acked_not_stored,
            "synced_users": len(streams), "sync_seconds": round(sync_seconds, 2),
            "missing_from_recipient_stream": missing_recipient, "missing_from_sender_stream": missing_sender,
            "live_duplicates": live_dups, "live_msg_id_differs_from_ack": msgid_mismatch,
            "misrouted": run.misrouted, "unexpected_frames": dict(run.unexpected),
            "connections_closed": len(closed), "queued_at_end": queued_at_end,
            "mix": args.mix, "mix_sent": dict(run.mix_sent), "mix_frames": dict(run.mix_frames),
            "mix_errors": dict(run.mix_errors),
        }
        if closed:
            print(f"connections that stopped early: {closed}", flush=True)
        if sync_failures:
            print(f"sync failures: {sync_failures}", flush=True)
            summary["sync_failures"] = len(sync_failures)
        if lost_examples:
            print(f"lost, first {len(lost_examples)}: {lost_examples}", flush=True)
        ok = bool(acked) and lost == 0 and duplicated == 0 and not sync_failures \
            and missing_recipient == 0 and missing_sender == 0
        summary["ok"] = ok
        print(json.dumps(summary), flush=True)
        if not acked:
            return 2
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        for conn in conns:
            conn.close()
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception as exc:
                print(f"stopping {proc.name} failed: {exc!r}", flush=True)
        services.close()
        if ok and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        elif procs:
            print(f"process logs kept in {tmp}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
