"""One group message to every online member: `python -m bench.group_fanout --members 2000`.

Provisions its own database, vhost and Redis db (real services when they
answer on 127.0.0.1, else embedded), starts M gateways, one persist worker
and one dispatch worker, creates a group of N members (users made directly in
the database, tokens minted with the run's JWT secret), connects every member
once (round-robin over the gateways), and then, K times, the owner sends one
message and the bench waits until every other member has it live. It reports
the ack time and the time until the first and the last member had it (from
the moment the send frame left), and checks that every member received each
message exactly once and that each member's sync stream holds it once.

All sockets are read by one thread with epoll, so the timestamps are not
skewed by thousands of reader threads. Prints progress while it connects and
sends; ends with a one-line JSON summary. Exit status 1 if a member missed a
message or got it twice.
"""
from __future__ import annotations

import argparse
import json
import selectors
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import websocket
from sqlalchemy import func, insert, select

from bench import close_run
from bench.load import ms, percentile
from tests.harness import Gateway, Worker, provision_embedded, provision_real, real_services_reachable

DELIVERY_TIMEOUT = 120.0
PING_EVERY = 20.0


def make_members(storage, settings, prefix: str, count: int) -> list[tuple[int, str]]:
    """N users with unusable passwords and fresh tokens: (user id, token)."""
    from app.accounts.sessions import bulk_access_tokens
    from models import User

    with storage.session() as session:
        session.execute(insert(User), [{"username": f"{prefix}{i}", "password_hash": "!bench"} for i in range(count)])
    with storage.sessions() as session:
        ids = session.scalars(select(User.id).where(User.username.like(f"{prefix}%")).order_by(User.id)).all()
    return list(zip(ids, bulk_access_tokens(storage, settings, list(ids))))


class Members:
    """Every member's socket, read by one epoll loop."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.sockets: list[websocket.WebSocket] = []
        self.owner: websocket.WebSocket | None = None

    def connect(self, url: str, token: str, index: int) -> None:
        ws = websocket.create_connection(f"{url}?token={token}", timeout=10)
        hello = json.loads(ws.recv())
        if hello.get("type") != "hello":
            raise RuntimeError(f"first frame was not hello: {hello}")
        if self.owner is None:
            self.owner = ws
        self.sockets.append(ws)
        self.selector.register(ws.sock, selectors.EVENT_READ, index)

    def ping_all(self) -> None:
        for ws in self.sockets:
            ws.send('{"type":"ping"}')

    def close(self) -> None:
        for ws in self.sockets:
            try:
                ws.close(timeout=0.1)
            except Exception:
                pass


def send_and_time(members: Members, gid: str, seq: int, prefix: str) -> dict:
    """The owner sends one message; returns its ack and delivery timings (seconds since the send)."""
    cmid = f"{prefix}-{seq}"
    others = len(members.sockets) - 1
    sent_at = time.perf_counter()
    members.owner.send(json.dumps({"type": "send", "client_msg_id": cmid, "group_id": gid,
                                   "content": f"fan-out message {seq}"}))
    ack_at, msg_id, arrivals, copies = None, None, {}, 0
    pending: list[tuple[int, str]] = []  # (member index, msg_id) seen before the ack told us the id
    deadline = sent_at + DELIVERY_TIMEOUT
    while (ack_at is None or len(arrivals) < others) and time.perf_counter() < deadline:
        for key, _ in members.selector.select(timeout=1.0):
            index, now = key.data, time.perf_counter()
            frame = json.loads(members.sockets[index].recv())
            if frame["type"] == "ack" and frame.get("client_msg_id") == cmid:
                ack_at, msg_id = now, frame["msg_id"]
            elif frame["type"] == "error":
                raise RuntimeError(f"send refused: {frame}")
            elif frame["type"] == "message" and frame.get("client_msg_id") == cmid:
                if index == 0:
                    raise RuntimeError("the sending connection got its own message back")
                copies += 1
                pending.append((index, frame["msg_id"]))
                arrivals.setdefault(index, now - sent_at)
    if msg_id is not None and any(mid != msg_id for _, mid in pending):
        raise RuntimeError("a member got a message under another id")
    return {"msg_id": msg_id, "ack": None if ack_at is None else ack_at - sent_at, "arrivals": arrivals,
            "duplicates": copies - len(arrivals), "missing": others - len(arrivals)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=2000, help="group size, the sender included")
    parser.add_argument("--messages", type=int, default=5, help="messages sent, one after the other")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=500, help="GROUP_FANOUT_CHUNK: members per fan-out task")
    parser.add_argument("--dispatch-concurrency", type=int, default=2)
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if not 2 <= args.members <= 20000 or args.messages < 1 or args.gateways < 1:
        parser.error("need 2 <= --members <= 20000, --messages >= 1, --gateways >= 1")

    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-fanout-"))
    run_id = uuid.uuid4().hex[:10]
    services = provision_real(run_id) if kind == "real" else provision_embedded("bench-fanout", tmp)
    procs, members, ok = [], Members(), False
    try:
        import os

        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV", "JWT_SECRET")})
        from app.config import Settings
        from app.chat.groups import create_group
        from app.storage import Storage, upgrade_schema
        from models import SyncEntry

        upgrade_schema(services.database_url)
        settings = Settings.from_env(group_max_members=max(2, args.members))
        storage = Storage(settings)
        print(f"starting {args.gateways} gateway(s), a persist and a dispatch worker ({kind} services, "
              f"logs in {tmp})...", flush=True)
        gateways = [Gateway(f"gw{i + 1}", services, tmp) for i in range(args.gateways)]
        procs += gateways
        procs.append(Worker("persist", "private_messages,group_messages", services, tmp, concurrency=1,
                            GROUP_FANOUT_CHUNK=str(args.chunk)))
        procs.append(Worker("dispatch", "offline_messages", services, tmp, concurrency=args.dispatch_concurrency))

        people = make_members(storage, settings, f"fan{run_id}-", args.members)
        group = create_group(storage, people[0][0], "bench group", [uid for uid, _ in people[1:]])
        gid = str(group.group_id)
        started = time.perf_counter()
        for i, (_, token) in enumerate(people):
            members.connect(gateways[i % len(gateways)].ws, token, i)
            if (i + 1) % 250 == 0 or i + 1 == len(people):
                print(f"  {i + 1}/{len(people)} members connected ({time.perf_counter() - started:.1f} s)",
                      flush=True)

        runs, last_ping = [], time.monotonic()
        for seq in range(args.messages):
            if time.monotonic() - last_ping > PING_EVERY:
                members.ping_all()
                last_ping = time.monotonic()
            result = send_and_time(members, gid, seq, f"fan{run_id}")
            runs.append(result)
            arrivals = sorted(result["arrivals"].values())
            print(f"  message {seq + 1}/{args.messages}: ack {ms(result['ack'])} ms, first member "
                  f"{ms(arrivals[0] if arrivals else None)} ms, last member {ms(arrivals[-1] if arrivals else None)} ms"
                  f", missing {result['missing']}, duplicates {result['duplicates']}", flush=True)
            # Drain stray frames (pongs) so the next message starts clean.
            for key, _ in members.selector.select(timeout=0.2):
                members.sockets[key.data].recv()

        with storage.sessions() as session:
            stream_counts = [session.scalar(select(func.count()).select_from(SyncEntry).where(
                SyncEntry.message_id == int(r["msg_id"]), SyncEntry.kind == 0)) if r["msg_id"] else 0 for r in runs]
        lost = sum(r["missing"] for r in runs) + sum(args.members - n for n in stream_counts)
        duplicated = sum(r["duplicates"] for r in runs) + sum(max(0, n - args.members) for n in stream_counts)
        last = [max(r["arrivals"].values()) for r in runs if r["arrivals"]]
        first = [min(r["arrivals"].values()) for r in runs if r["arrivals"]]
        acks = [r["ack"] for r in runs if r["ack"] is not None]
        summary = {
            "bench": "group_fanout", "services": kind, "members": args.members, "gateways": args.gateways,
            "chunk": args.chunk, "dispatch_concurrency": args.dispatch_concurrency, "messages": args.messages,
            "ack_ms_median": ms(statistics.median(acks)) if acks else None,
            "first_member_ms_median": ms(statistics.median(first)) if first else None,
            "last_member_ms_median": ms(statistics.median(last)) if last else None,
            "last_member_ms_max": ms(max(last)) if last else None,
            "all_members_p99_ms": ms(percentile([t for r in runs for t in r["arrivals"].values()], 99)),
            "lost": lost, "duplicated": duplicated,
        }
        print(json.dumps(summary), flush=True)
        ok = lost == 0 and duplicated == 0
        return 0 if ok else 1
    finally:
        members.close()
        for proc in reversed(procs):
            proc.stop()
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
