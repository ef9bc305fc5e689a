"""The cost of typing relays: `python -m bench.typing --users 1000 --seconds 20`.

Provisions its own database, vhost and Redis db (like the tests), makes U users
(U/2 private pairs) directly in the database and starts TWO gateways (gunicorn
master + one gevent worker each; no worker processes: typing never touches the
pipeline). Every pair has one user on each gateway, so every relay crosses
gateways through the delivery channel, as in production. The clients are one
asyncio loop of minimal WebSocket clients (bench/conns.py), in this process.

Each user sends `{"type":"typing","state":"start"}` to its peer every
1/--rate seconds (default every 2 s, a fast typist's client; from 1 s on the
relay limit of one start per second drops frames, so --rate 3 measures the
drop path too), staggered evenly. Over the window the bench reads the CPU
time of both gateway workers from /proc and counts the typing frames the peers
received. Figures: frames offered/s, relays/s (frames received), dropped
(offered - received), gateway CPU ms per relay and per offered frame, and the
gateways' CPU share. Ends with a one-line JSON summary. Exit status 1 when a
connection failed, an error frame arrived, or (at --rate <= 0.5) fewer than
95% of the frames were relayed (at 1, scheduling jitter alone brings two
starts within a second).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import signal
import socket
import time
import uuid

from bench import close_run, open_run
from bench.conns import WsClient, ClientStats, cpu_ticks, mask_frame, raise_nofile, worker_pid


class TypingClient(WsClient):
    """Counts the typing frames (and errors) that reach it."""

    __slots__ = ("counts",)

    def __init__(self, stats, request, key, done, counts: dict):
        super().__init__(stats, request, key, done)
        self.counts = counts

    def _text(self, payload: bytes):
        if b'"typing"' in payload:
            self.counts["typing"] += 1
        elif b'"error"' in payload:
            self.counts["error"] += 1
            self.counts.setdefault("first_error", payload[:200].decode(errors="replace"))
        else:
            super()._text(payload)

    def typing(self, frame: bytes) -> bool:
        if self.closed or not self.hello:
            return False
        self.transport.write(mask_frame(frame))
        return True


def make_users(storage, settings, prefix: str, count: int) -> list[tuple[int, str]]:
    """(user id, token) of `count` new users, in id order."""
    from sqlalchemy import insert, select

    from app.accounts.auth import issue_token
    from models import User

    with storage.session() as session:
        session.execute(insert(User), [{"username": f"{prefix}{i}", "password_hash": "!bench"} for i in range(count)])
    with storage.sessions() as session:
        ids = session.scalars(select(User.id).where(User.username.like(f"{prefix}%")).order_by(User.id)).all()
    return [(uid, issue_token(settings, uid)) for uid in ids]


async def open_client(loop, port: int, token: str, counts: dict, stats: ClientStats) -> TypingClient:
    key = base64.b64encode(os.urandom(16))
    request = (f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
               ).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 30)
    done = loop.create_future()
    _, client = await loop.create_connection(lambda: TypingClient(stats, request, key, done, counts), sock=sock)
    if not await asyncio.wait_for(done, 60):
        raise RuntimeError(f"a connection got no hello: {dict(stats.errors)}")
    return client


async def run(ports: tuple[int, int], users: list[tuple[int, str]], rate: float, seconds: float, pids: list[int],
              say) -> dict:
    loop = asyncio.get_running_loop()
    counts, stats = {"typing": 0, "error": 0}, ClientStats()
    gate = asyncio.Semaphore(50)

    async def one(index: int, token: str):
        async with gate:
            return await open_client(loop, ports[index % 2], token, counts, stats)

    clients = await asyncio.gather(*(one(i, token) for i, (_, token) in enumerate(users)))
    say(f"{len(clients)} connections open ({len(clients) // 2} on each gateway)")
    frames = []
    for i, (uid, _) in enumerate(users):
        peer = users[i ^ 1][0]
        low, high = sorted((uid, peer))
        frames.append(json.dumps({"type": "typing", "conversation_id": f"p_{low}_{high}", "state": "start"},
                                 separators=(",", ":")).encode())
    # Warm-up: one start from everyone, spread over 2 s (the parties caches fill), then the limit's second passes.
    for i, (client, frame) in enumerate(zip(clients, frames)):
        client.typing(frame)
        if i % 50 == 49:
            await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)
    counts["typing"] = 0
    interval = 1.0 / rate
    ticks0, t0 = [cpu_ticks(pid) for pid in pids], time.monotonic()
    offered, start = 0, loop.time()
    # (due time, client index), staggered evenly; one interval for all keeps it in due order.
    schedule = collections.deque((start + interval * i / len(clients), i) for i in range(len(clients)))
    end = start + seconds
    while loop.time() < end:
        now = loop.time()
        while schedule and schedule[0][0] <= now:
            due, i = schedule.popleft()
            if clients[i].typing(frames[i]):
                offered += 1
            schedule.append((due + interval, i))
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)  # relays still on the wire
    elapsed = time.monotonic() - t0
    cpu = [(cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") for pid, before in zip(pids, ticks0)]
    relayed = counts["typing"]
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)
    return {"offered": offered, "relayed": relayed, "errors": counts["error"], "first_error": counts.get("first_error"),
            "window_s": round(seconds, 2), "elapsed_s": round(elapsed, 2), "gateway_cpu_s": [round(c, 2) for c in cpu],
            "dropped_connections": stats.dropped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="online users (even: pairs)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    parser.add_argument("--rate", type=float, default=0.5, help="typing frames per user per second (clients "
                        "repeat `start` every <= 5 s; above 1 the relay limit drops the excess)")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.users < 2 or args.users % 2 or args.rate <= 0 or args.seconds <= 0:
        parser.error("need an even --users >= 2, --rate > 0 and --seconds > 0")

    from tests.harness import Gateway

    from bench.baseline import interrupted

    signal.signal(signal.SIGTERM, interrupted)
    raise_nofile()
    kind, tmp, services = open_run(args.services, "typing")
    gateways, ok, t0 = [], False, time.monotonic()

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
        say(f"making {args.users} users ({kind} services)...")
        users = make_users(storage, settings, f"typ{uuid.uuid4().hex[:8]}-", args.users)
        storage.dispose()
        env = {"GATEWAY_MAX_CONNECTIONS": str(args.users + 100)}
        gateways = [Gateway("gw1", services, tmp, **env), Gateway("gw2", services, tmp, **env)]
        pids = [worker_pid(g.proc.pid) for g in gateways]
        say(f"two gateways up (worker pids {pids}); {args.users} users typing at {args.rate:.2f}/s each "
            f"for {args.seconds:g} s...")
        result = asyncio.run(run((gateways[0].port, gateways[1].port), users, args.rate, args.seconds, pids, say))
        relays_per_s = result["relayed"] / args.seconds
        cpu_total = sum(result["gateway_cpu_s"])
        summary = {
            "bench": "typing", "services": kind, "users": args.users, "rate_per_user": round(args.rate, 3),
            **result,
            "offered_per_s": round(result["offered"] / args.seconds, 1), "relays_per_s": round(relays_per_s, 1),
            "dropped_frames": result["offered"] - result["relayed"],
            "gateway_cpu_ms_per_relay": round(cpu_total * 1000 / result["relayed"], 3) if result["relayed"] else None,
            "gateway_cpu_ms_per_frame": round(cpu_total * 1000 / result["offered"], 3) if result["offered"] else None,
            "gateway_cpu_share": [round(c / result["elapsed_s"], 3) for c in result["gateway_cpu_s"]],
        }
        say(f"offered {summary['offered_per_s']}/s, relayed {summary['relays_per_s']}/s "
            f"({summary['dropped_frames']} dropped by the relay limit), gateway CPU "
            f"{summary['gateway_cpu_ms_per_relay']} ms per relay, {summary['gateway_cpu_share']} of a core each")
        print(json.dumps(summary), flush=True)
        bad = result["errors"] or result["dropped_connections"] or (
            args.rate <= 0.5 and result["relayed"] < 0.95 * result["offered"])
        ok = not bad
        return 1 if bad else 0
    finally:
        for gateway in reversed(gateways):
            gateway.stop()
        close_run(services, tmp, ok, keep_logs=args.keep_logs)


if __name__ == "__main__":
    raise SystemExit(main())
