"""Idle connections on one gateway process: `python -m bench.conns --connections 20000`.

Provisions its own database, vhost and Redis db (like the tests: real services
when they answer on 127.0.0.1, else embedded), makes C users directly in the
database (tokens minted with the run's JWT secret) and starts ONE gateway
(gunicorn master + one gevent worker, GATEWAY_MAX_CONNECTIONS raised to fit C).

The client side is cheap: a few client processes (this module with --client),
each an asyncio loop of minimal hand-written WebSocket clients (one socket and
one small protocol object per connection, no thread). Each socket is bound to
one of several source addresses 127.0.0.2, 127.0.0.3, ... so that more than
the ~28,000 ephemeral ports of one address pair are available. A process
holds at most --per-client connections, so its own RLIMIT_NOFILE suffices.

Phases:
 1. warm-up: one connection opened and closed, so the gateway's background
    loops and lazy imports exist before the "before" figure;
 2. the gateway worker's RSS before (VmRSS of the worker, not the master);
 3. C connections opened (progress every 2 s); each must get `hello`;
 4. RSS right after, then a heartbeat window (--window, default two
    heartbeat intervals) in which every connection sends `ping` once per the
    heartbeat interval hello announced, spread evenly, as real clients do; the
    gateway worker's CPU% is read from /proc/<pid>/stat over that window;
 5. RSS after the window; the clients close; every ping must have had its pong
    and no connection may have been closed by the gateway.

RSS per connection = (RSS after opening - RSS before) / C.

The gateway worker needs C + its own descriptors under RLIMIT_NOFILE. The
bench raises the soft limit of the bench, the clients and the gateway worker
to the hard limit when that is needed (and says so); a hard limit below
what C needs cannot be raised without CAP_SYS_RESOURCE: the bench then stops
before connecting and names the largest C that fits.

--deflate makes the clients offer permessage-deflate (as browsers do), to
measure what a negotiated compressor/decompressor pair costs per connection.

Ends with a one-line JSON summary. Exit status 1 when a connection failed to
open, did not get hello, missed a pong or was dropped (`lost` in the summary);
2 when the gateway cannot hold C sockets.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

from bench import close_run

PROGRESS_EVERY = 2.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PING = b'{"type":"ping"}'
FD_HEADROOM = 100  # descriptors the gateway worker needs besides client sockets (listener, Redis and DB pools, logs)


# ---------------------------------------------------------------------------
# client side (python -m bench.conns --client): asyncio, no threads per socket

class ClientStats:
    def __init__(self):
        self.attempted = self.opened = self.hello = self.failed = self.dropped = 0
        self.pings = self.pongs = self.other_frames = self.deflate_negotiated = 0
        self.errors: collections.Counter = collections.Counter()
        self.close_codes: collections.Counter = collections.Counter()
        self.heartbeat_interval: float | None = None

    def as_dict(self) -> dict:
        return {"attempted": self.attempted, "opened": self.opened, "hello": self.hello, "failed": self.failed,
                "dropped": self.dropped, "pings": self.pings, "pongs": self.pongs, "other_frames": self.other_frames,
                "deflate_negotiated": self.deflate_negotiated, "errors": dict(self.errors.most_common(5)),
                "close_codes": dict(self.close_codes), "heartbeat_interval": self.heartbeat_interval}


def mask_frame(payload: bytes, opcode: int = 0x1, compressed: bool = False) -> bytes:
    """One final, masked client frame (payloads < 126 bytes: pings and closes)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | (0x40 if compressed else 0) | opcode, 0x80 | len(payload))) + key + masked


class WsClient(asyncio.Protocol):
    """A minimal RFC 6455 client: handshake, unmasked server frames in, masked frames out."""

    __slots__ = ("stats", "request", "key", "transport", "buffer", "upgraded", "hello", "closed", "inflate",
                 "deflate", "done", "pending_pongs", "stopping")

    def __init__(self, stats: ClientStats, request: bytes, key: bytes, done: asyncio.Future):
        self.stats, self.request, self.key, self.done = stats, request, key, done
        self.transport = None
        self.buffer = bytearray()
        self.upgraded = self.hello = self.closed = self.stopping = False
        self.inflate = self.deflate = None
        self.pending_pongs = 0

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes):
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[:end + 4]
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest()).decode()
            if not lines[0].startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
                self._fail(f"handshake: {lines[0][:60]}")
                return
            self.upgraded = True
            if "permessage-deflate" in headers.get("sec-websocket-extensions", ""):
                self.stats.deflate_negotiated += 1
                self.inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                # Our pings go compressed too, as a browser's would (its context kept from message to
                # message); a 512-byte window keeps the bench's own memory small, any window <= 15 is valid.
                self.deflate = zlib.compressobj(1, zlib.DEFLATED, -9, 1)
        self._frames()

    def _frames(self):
        buf = self.buffer
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            length, offset = b1 & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset:offset + length])
            del buf[:offset + length]
            opcode = b0 & 0x0F
            if b0 & 0x40 and self.inflate is not None:  # RSV1: a compressed message (always final here)
                payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
            if opcode == 0x1:
                self._text(payload)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                self._closed_by_server(code)
                return
            elif opcode == 0x9:
                self.transport.write(mask_frame(payload, 0xA))

    def _text(self, payload: bytes):
        try:
            frame = json.loads(payload)
        except ValueError:
            self.stats.other_frames += 1
            return
        kind = frame.get("type")
        if kind == "pong" and self.pending_pongs > 0:
            self.pending_pongs -= 1
            self.stats.pongs += 1
        elif kind == "hello" and not self.hello:
            self.hello = True
            self.stats.hello += 1
            self.stats.heartbeat_interval = frame.get("heartbeat_interval")
            if not self.done.done():
                self.done.set_result(True)
        else:
            self.stats.other_frames += 1

    def ping(self) -> bool:
        if self.closed or not self.hello:
            return False
        if self.deflate is not None:
            data = self.deflate.compress(PING) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
            self.transport.write(mask_frame(data[:-4], compressed=True))  # minus the 00 00 ff ff tail
        else:
            self.transport.write(mask_frame(PING))
        self.pending_pongs += 1
        self.stats.pings += 1
        return True

    def _closed_by_server(self, code: int):
        if not self.hello:  # refused after the upgrade (or an HTTP error page written on the upgraded socket)
            self._fail(f"closed before hello ({code})")
            return
        if not self.closed and not self.stopping:
            self.stats.close_codes[code] += 1
            self.stats.dropped += 1
        self.closed = True
        self.transport.close()

    def _fail(self, why: str):
        self.stats.errors[why] += 1
        self.closed = True
        self.transport.close()
        if not self.done.done():
            self.done.set_result(False)

    def connection_lost(self, exc):
        if not self.closed and not self.stopping:
            self.closed = True
            if self.hello:
                self.stats.dropped += 1
                self.stats.close_codes["eof"] += 1
            elif not self.done.done():
                self.stats.errors[f"eof before hello: {exc!r}"[:80]] += 1
        self.closed = True
        if not self.done.done():
            self.done.set_result(False)

    def close(self):
        self.stopping = True
        if not self.closed and self.transport is not None:
            self.closed = True
            try:
                self.transport.write(mask_frame(struct.pack("!H", 1000), 0x8))
            except Exception:
                pass
            self.transport.close()


async def client_main(config: dict) -> None:
    loop = asyncio.get_running_loop()
    stats = ClientStats()
    host, port, path = config["host"], config["port"], config["path"]
    sources, deflate = config["sources"], config["deflate"]
    interval_override = config.get("ping_interval")
    tokens = Path(config["tokens_file"]).read_text().split()
    clients: list[WsClient] = []
    # (due time, client): every client pings once per interval, in the order it got hello.
    schedule: collections.deque = collections.deque()
    stop = asyncio.Event()

    def out(kind: str, **fields) -> None:
        sys.stdout.write(f"{kind} {json.dumps({**stats.as_dict(), **fields})}\n")
        sys.stdout.flush()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)

    async def open_one(index: int, token: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            stats.attempted += 1
            key = base64.b64encode(os.urandom(16))
            request = (f"GET {path}?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
                       + ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else "")
                       + "\r\n").encode()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # port chosen at connect()
                sock.bind((sources[index % len(sources)], 0))
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 30)
                done = loop.create_future()
                _, client = await loop.create_connection(lambda: WsClient(stats, request, key, done), sock=sock)
                clients.append(client)
                stats.opened += 1
                if not await asyncio.wait_for(done, 60):
                    stats.failed += 1
                    return
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                stats.failed += 1
                stats.errors[type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else "")] += 1
                return
            interval = interval_override or stats.heartbeat_interval or 30
            schedule.append((loop.time() + interval, client))

    async def heartbeat() -> None:
        while not stop.is_set():
            now = loop.time()
            while schedule and schedule[0][0] <= now:
                _, client = schedule.popleft()
                if client.ping():
                    interval = interval_override or stats.heartbeat_interval or 30
                    schedule.append((now + interval, client))
            await asyncio.sleep(0.05)

    async def report() -> None:
        while not stop.is_set():
            out("progress")
            await asyncio.sleep(1.0)

    beat = asyncio.ensure_future(heartbeat())
    reporter = asyncio.ensure_future(report())
    gate = asyncio.Semaphore(config["concurrency"])
    await asyncio.gather(*(open_one(config["first_index"] + i, t, gate) for i, t in enumerate(tokens)))
    out("ready")
    await stop.wait()
    # Answers to pings still on the wire: give them a moment (bounded), then close.
    deadline = loop.time() + 5
    while loop.time() < deadline and any(c.pending_pongs and not c.closed for c in clients):
        await asyncio.sleep(0.05)
    missed = sum(c.pending_pongs for c in clients if not c.closed)
    beat.cancel()
    reporter.cancel()
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)
    out("done", missed_pongs=missed)


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_client() -> int:
    raise_nofile()
    config = json.loads(sys.stdin.readline())
    asyncio.run(client_main(config))
    return 0


# ---------------------------------------------------------------------------
# --tracemalloc: where the gateway's memory goes

# Put on the gateway's PYTHONPATH as sitecustomize.py: tracemalloc from the
# start, and in the forked worker a plain OS thread (made before gevent
# patches anything) that writes a snapshot when the bench asks for one by
# creating <dir>/snap-<name>.request.
TRACEMALLOC_HOOK = """
import os, threading, time, tracemalloc
_dir = os.environ.get("NL_BENCH_TRACEMALLOC_DIR")
if _dir:
    _sleep = time.sleep

    def _watch():
        while True:
            for name in sorted(os.listdir(_dir)):
                if not name.endswith(".request"):
                    continue
                if name == "start.request":  # traced from now on (tracing the imports takes minutes)
                    tracemalloc.start(int(os.environ.get("NL_BENCH_TRACEMALLOC_FRAMES", "12")))
                else:
                    target = os.path.join(_dir, name[:-len(".request")])
                    tracemalloc.take_snapshot().dump(target + ".tmp")
                    os.rename(target + ".tmp", target)
                os.unlink(os.path.join(_dir, name))
            _sleep(0.2)

    os.register_at_fork(after_in_child=lambda: threading.Thread(target=_watch, daemon=True).start())
"""


def start_tracing(directory: Path) -> None:
    from tests.harness import wait_until

    (directory / "start.request").touch()
    wait_until(lambda: not (directory / "start.request").exists(), timeout=30, what="tracemalloc to start")


def request_snapshot(directory: Path, name: str, timeout: float = 120):
    import tracemalloc

    from tests.harness import wait_until

    (directory / f"snap-{name}.request").touch()
    target = directory / f"snap-{name}"
    wait_until(target.exists, timeout=timeout, interval=0.2, what=f"tracemalloc snapshot {name}")
    return tracemalloc.Snapshot.load(str(target))


def memory_report(before, after, connections: int, top: int = 25) -> list[dict]:
    """Growth between two snapshots by allocating line, per connection, biggest first."""
    import tracemalloc

    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    rows = []
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), "traceback")
    total_diff = sum(s.size_diff for s in stats)
    by_line: dict[str, list] = {}
    for stat in stats:
        # Name the allocation by its innermost frame and the first frame in our code or a library above it.
        frames = list(stat.traceback)
        inner = frames[-1] if frames else None  # tracemalloc keeps the most recent frame last when sorted
        key = f"{inner.filename.split('site-packages/')[-1]}:{inner.lineno}" if inner else "?"
        caller = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames[:-1])
                       if "/work/" in f.filename and "site-packages" not in f.filename), "")
        slot = by_line.setdefault(key, [0, 0, collections.Counter()])
        slot[0] += stat.size_diff
        slot[1] += stat.count_diff
        if caller:
            slot[2][caller] += stat.size_diff
    for key, (size, count, callers) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[:top]:
        rows.append({"where": key, "bytes_per_connection": round(size / connections), "blocks_per_connection":
                     round(count / connections, 2), "via": [c for c, _ in callers.most_common(2)]})
    by_package: collections.Counter = collections.Counter()
    for key, (size, _, _) in by_line.items():
        path = key.rsplit(":", 1)[0]
        if path.startswith("/") and "/.venv/" not in path and "/lib/python3" in path:
            package = "stdlib " + path.rsplit("/", 1)[-1]
        elif path.startswith("/"):  # this repository's code
            package = "/".join(path.rsplit("/", 2)[-2:])
        else:  # site-packages/<package>/...
            package = path.split("/")[0]
        by_package[package] += size
    for package, size in by_package.most_common(12):
        rows.append({"where": f"package {package}", "bytes_per_connection": round(size / connections)})
    rows.append({"where": "TOTAL traced", "bytes_per_connection": round(total_diff / connections)})
    return rows


# ---------------------------------------------------------------------------
# the bench (parent)

def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in kB (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))


def nofile_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return int(parts[3]), int(parts[4])
    raise KeyError("Max open files")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_pid(master_pid: int, timeout: float = 30) -> int:
    """The gunicorn worker: the master's only child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("the gunicorn master has no worker")


def spy_summary(path: str, top: int = 20, roots: tuple[str, ...] = ()) -> list[tuple[float, str]]:
    """The functions most often on the stack in py-spy's raw output, as a share of all samples.

    With `roots` (function names such as "Gateway.serve"), a sample counts only
    from the first of them down: the wrappers above (gunicorn, Flask, Celery's
    pool) are left out and the roots themselves show how the time divides.
    """
    inclusive: collections.Counter = collections.Counter()
    samples = 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples += int(count)
        frames = []
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            frames.append((name, f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"))
        if roots:
            start = next((i for i, (name, _) in enumerate(frames) if name in roots), None)
            frames = [] if start is None else frames[start:]
        for label in {label for _, label in frames}:
            inclusive[label] += int(count)
    return [(100 * n / samples, name) for name, n in inclusive.most_common(top)] if samples else []


def make_users(storage, settings, prefix: str, count: int) -> list[str]:
    """C users with unusable passwords (inserted in batches) and a token for each."""
    from sqlalchemy import insert, select

    from app.accounts.sessions import bulk_access_tokens
    from models import User

    with storage.session() as session:
        for start in range(0, count, 5000):
            session.execute(insert(User), [{"username": f"{prefix}{i}", "password_hash": "!bench"}
                                           for i in range(start, min(count, start + 5000))])
    with storage.sessions() as session:
        ids = session.scalars(select(User.id).where(User.username.like(f"{prefix}%")).order_by(User.id)).all()
    return bulk_access_tokens(storage, settings, list(ids))


class ClientProc:
    """One client process and the latest line of each kind it printed."""

    def __init__(self, index: int, config: dict, tmp: Path):
        self.index = index
        self.latest: dict[str, dict] = {}
        self.last: dict = {}  # the newest line of any kind
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.stderr_path = tmp / f"client-{index}.err"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.conns", "--client"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
                                     cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        self.proc.stdin.write(json.dumps(config) + "\n")
        self.proc.stdin.flush()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, _, body = line.partition(" ")
            try:
                self.latest[kind] = self.last = json.loads(body)
            except ValueError:
                continue
            if kind == "ready":
                self.ready.set()
            elif kind == "done":
                self.finished.set()
        self.ready.set()
        self.finished.set()

    def stats(self) -> dict:
        return self.last

    def stop(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._stderr.close()


def total(clients: list[ClientProc], key: str) -> int:
    return sum(int(c.stats().get(key, 0) or 0) for c in clients)


def main() -> int:
    if "--client" in sys.argv[1:]:
        return run_client()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=20_000, help="idle connections to open (C)")
    parser.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.2 ... to spread them over")
    parser.add_argument("--per-client", type=int, default=8000, help="connections per client process")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="handshakes in flight, over all client processes (a connect storm beyond the "
                             "gateway's DB pool of 10 makes it open and close overflow connections)")
    parser.add_argument("--heartbeat-interval", type=int, default=None,
                        help="HEARTBEAT_INTERVAL_SECONDS of the gateway (default: its own default, 30)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds of heartbeating measured (default: two heartbeat intervals)")
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate, like browsers")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the gateway (repeatable), e.g. WS_PERMESSAGE_DEFLATE=false")
    parser.add_argument("--py-spy", dest="py_spy", metavar="FILE",
                        help="record the gateway worker with py-spy during the window (collapsed stacks, which "
                             "speedscope and flamegraph.pl read) and print its busiest functions")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the gateway's allocations and print what the connections added, by line "
                             "(slows the gateway down; RSS figures of such a run include tracemalloc's own)")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if any("=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes NAME=VALUE")
    if args.connections < 1 or not 1 <= args.sources <= 250 or args.per_client < 1 or args.concurrency < 1:
        parser.error("need --connections >= 1, 1 <= --sources <= 250, --per-client >= 1, --concurrency >= 1")

    from tests.harness import (
        ChatClient, Gateway, provision_embedded, provision_real, real_services_reachable, sample, scrape, wait_until,
    )

    from bench.baseline import interrupted

    signal.signal(signal.SIGTERM, interrupted)  # `kill` cleans up like Ctrl-C
    soft, hard = raise_nofile()  # the gateway is started from here and inherits it
    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-conns-"))
    run_id = uuid.uuid4().hex[:10]
    services = provision_real(run_id) if kind == "real" else provision_embedded("bench-conns", tmp)
    gateway, clients, ok, t0 = None, [], False, time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)

    try:
        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV", "JWT_SECRET")})
        from app.config import Settings
        from app.storage import Storage, upgrade_schema

        upgrade_schema(services.database_url)
        settings = Settings.from_env()
        storage = Storage(settings)
        say(f"making {args.connections} users ({kind} services, logs in {tmp})...")
        tokens = make_users(storage, settings, f"idle{run_id}-", args.connections)
        storage.dispose()
        env = {"GATEWAY_MAX_CONNECTIONS": str(args.connections + 100)}
        if args.heartbeat_interval:
            env["HEARTBEAT_INTERVAL_SECONDS"] = str(args.heartbeat_interval)
        env.update(item.split("=", 1) for item in args.gateway_env)
        trace_dir = None
        if args.tracemalloc:
            trace_dir = tmp / "tracemalloc"
            (trace_dir / "hook").mkdir(parents=True)
            (trace_dir / "hook" / "sitecustomize.py").write_text(TRACEMALLOC_HOOK)
            env.update(PYTHONPATH=str(trace_dir / "hook"), NL_BENCH_TRACEMALLOC_DIR=str(trace_dir))
        gateway = Gateway("gw1", services, tmp, **env)
        pid = worker_pid(gateway.proc.pid)

        # Warm-up: the first connection starts the gateway's background loops and imports.
        warm = ChatClient(gateway.ws, tokens[0])
        interval = int(warm.hello["heartbeat_interval"])
        warm.close()
        window = args.window if args.window is not None else 2.0 * interval

        gw_soft, gw_hard = nofile_limits(pid)
        base_fds = open_fds(pid)
        need = args.connections + base_fds + FD_HEADROOM
        limit_note = f"gateway worker RLIMIT_NOFILE soft {gw_soft}, hard {gw_hard}; {base_fds} fds open"
        if gw_soft < need <= gw_hard:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (gw_hard, gw_hard))
            gw_soft = nofile_limits(pid)[0]
            limit_note += f"; raised its soft limit to {gw_soft}"
        say(limit_note)
        if gw_soft < need:
            fits = gw_soft - base_fds - FD_HEADROOM
            print(f"the gateway worker cannot hold {args.connections} sockets: RLIMIT_NOFILE is {gw_soft} "
                  f"(hard {gw_hard}) and it needs about {need} (C + {base_fds} open + {FD_HEADROOM} headroom). "
                  f"Raise the hard limit (root with CAP_SYS_RESOURCE: ulimit -Hn, LimitNOFILE=, compose "
                  f"ulimits) or run with --connections {fits}.", flush=True)
            print(json.dumps({"bench": "conns", "services": kind, "connections": args.connections,
                              "error": "gateway RLIMIT_NOFILE too low", "nofile_soft": gw_soft,
                              "nofile_hard": gw_hard, "max_connections_here": fits}), flush=True)
            ok = True  # nothing ran: no logs worth keeping
            return 2

        # The warm-up connection's teardown is over before the "before" figure.
        wait_until(lambda: sample(scrape(gateway.http + "/metrics"), "netherlink_gateway_connections") == 0,
                   timeout=10, what="the warm-up connection to close")
        snap_before = None
        if trace_dir is not None:
            start_tracing(trace_dir)
            snap_before = request_snapshot(trace_dir, "before")
        rss_before = proc_status(pid, "VmRSS")
        say(f"gateway worker pid {pid}: RSS {rss_before / 1024:.1f} MiB before; opening {args.connections} "
            f"connections from {args.sources} source address(es), heartbeat every {interval} s...")

        token_dir = tmp / "tokens"
        token_dir.mkdir()
        sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
        n_clients = max(1, math.ceil(args.connections / args.per_client))
        share = math.ceil(args.connections / n_clients)
        opened_at = time.monotonic()
        for c in range(n_clients):
            chunk = tokens[c * share:(c + 1) * share]
            if not chunk:
                continue
            path = token_dir / f"client-{c}.txt"
            path.write_text("\n".join(chunk))
            clients.append(ClientProc(c, {
                "host": "127.0.0.1", "port": gateway.port, "path": "/ws", "sources": sources,
                "deflate": args.deflate, "tokens_file": str(path), "first_index": c * share,
                "concurrency": max(1, args.concurrency // n_clients), "ping_interval": None}, tmp))
        next_progress = time.monotonic() + PROGRESS_EVERY
        while not all(c.ready.is_set() for c in clients):
            time.sleep(0.1)
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                say(f"opening: {total(clients, 'hello')}/{args.connections} got hello, "
                    f"{total(clients, 'failed')} failed; gateway RSS {proc_status(pid, 'VmRSS') / 1024:.1f} MiB")
        connect_seconds = time.monotonic() - opened_at
        hello, failed = total(clients, "hello"), total(clients, "failed")
        rss_open = proc_status(pid, "VmRSS")
        say(f"{hello}/{args.connections} connections got hello in {connect_seconds:.1f} s ({failed} failed); "
            f"gateway RSS {rss_open / 1024:.1f} MiB ({(rss_open - rss_before) / max(1, hello):.1f} KiB per connection)")

        memory = None
        if trace_dir is not None:
            say("tracemalloc: taking the gateway's snapshot...")
            memory = memory_report(snap_before, request_snapshot(trace_dir, "open"), max(1, hello))
            for row in memory:
                print(f"  {row['bytes_per_connection']:7d} B/conn  {row.get('blocks_per_connection', '')!s:>6} "
                      f"blocks  {row['where']}  {' < '.join(row.get('via', []))}", flush=True)

        # Heartbeat window.
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                    "--duration", str(max(1, int(window))), "--rate", "50", "--format", "raw",
                                    "--output", args.py_spy, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        hz = os.sysconf("SC_CLK_TCK")
        ticks0, w0, pings0 = cpu_ticks(pid), time.monotonic(), total(clients, "pings")
        window_end = w0 + window
        next_progress = w0 + max(PROGRESS_EVERY, min(10.0, window / 6))
        rss_peak = rss_open
        while time.monotonic() < window_end:
            time.sleep(min(0.25, max(0.0, window_end - time.monotonic())))
            rss_peak = max(rss_peak, proc_status(pid, "VmRSS"))
            if time.monotonic() >= next_progress:
                next_progress += max(PROGRESS_EVERY, min(10.0, window / 6))
                used = (cpu_ticks(pid) - ticks0) / hz / (time.monotonic() - w0) * 100
                say(f"heartbeating: {total(clients, 'pings') - pings0} pings, {total(clients, 'pongs')} pongs so far, "
                    f"{total(clients, 'dropped')} dropped; gateway CPU {used:.1f} %, "
                    f"RSS {proc_status(pid, 'VmRSS') / 1024:.1f} MiB")
        ticks1, w1 = cpu_ticks(pid), time.monotonic()
        cpu_percent = (ticks1 - ticks0) / hz / (w1 - w0) * 100
        pings_in_window = total(clients, "pings") - pings0
        rss_after = proc_status(pid, "VmRSS")
        if spy is not None:
            spy.wait(timeout=window + 30)
            for share, name in spy_summary(args.py_spy, 25, ("Gateway.serve", "Base._thread", "Hub.run",
                                                              "Connection._write_loop", "Gateway._maintenance_loop",
                                                              "Gateway._delivery_loop")):
                print(f"  py-spy {share:5.1f} %  {name}", flush=True)

        for client in clients:
            client.stop()
        for client in clients:
            client.finished.wait(30)
        stats = {key: total(clients, key) for key in ("attempted", "opened", "hello", "failed", "dropped", "pings",
                                                      "pongs", "other_frames", "deflate_negotiated", "missed_pongs")}
        errors: collections.Counter = collections.Counter()
        closes: collections.Counter = collections.Counter()
        for client in clients:
            errors.update(client.stats().get("errors", {}))
            closes.update(client.stats().get("close_codes", {}))
        # What the gateway complained about meanwhile (connection ids left out, so that alike lines add up).
        complaints: collections.Counter = collections.Counter()
        for line in gateway.log_text().splitlines():
            if " WARNING " in line or " ERROR " in line:
                text = line.split(" ", 2)[-1]
                complaints[" ".join("conn-X" if w.startswith(("gw1-", "gw1:")) else w for w in text.split())] += 1
        lost = (args.connections - stats["hello"]) + stats["dropped"]
        per_conn = (rss_open - rss_before) / max(1, stats["hello"])
        summary = {
            "bench": "conns", "services": kind, "connections": args.connections, "sources": args.sources,
            "client_processes": len(clients), "gateway_env": args.gateway_env, "deflate_offered": args.deflate,
            "deflate_negotiated": stats["deflate_negotiated"], "hello": stats["hello"], "failed": stats["failed"],
            "dropped": stats["dropped"], "lost": lost, "connect_seconds": round(connect_seconds, 1),
            "connects_per_second": round(stats["hello"] / connect_seconds, 1) if connect_seconds else None,
            "rss_before_mib": round(rss_before / 1024, 1), "rss_open_mib": round(rss_open / 1024, 1),
            "rss_after_window_mib": round(rss_after / 1024, 1), "rss_peak_mib": round(rss_peak / 1024, 1),
            "rss_per_connection_kib": round(per_conn, 1),
            "rss_per_connection_after_window_kib": round((rss_after - rss_before) / max(1, stats["hello"]), 1),
            "heartbeat_interval": interval, "window_seconds": round(w1 - w0, 1), "pings_in_window": pings_in_window,
            "pings": stats["pings"], "pongs": stats["pongs"], "missed_pongs": stats["missed_pongs"],
            "gateway_cpu_percent": round(cpu_percent, 1),
            "gateway_cpu_ms_per_ping": round((ticks1 - ticks0) / hz * 1000 / pings_in_window, 3)
            if pings_in_window else None,
            "gateway_nofile": [gw_soft, gw_hard], "errors": dict(errors.most_common(5)), "close_codes": dict(closes),
            "gateway_warnings": sum(complaints.values()), "gateway_warnings_top": dict(complaints.most_common(3)),
        }
        if args.py_spy:
            summary["py_spy"] = args.py_spy
        if memory is not None:
            summary["tracemalloc_bytes_per_connection"] = memory[-1]["bytes_per_connection"]
        ok = lost == 0 and stats["missed_pongs"] == 0
        summary["ok"] = ok
        print(json.dumps(summary), flush=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        for client in clients:
            client.kill()
        if gateway is not None:
            gateway.stop()
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
