"""Time to sync a backlog: `python -m bench.sync --messages 10000`.

Provisions its own database, vhost and Redis db (like the tests: real services
when they answer on 127.0.0.1, else embedded), seeds one recipient's stream
with K messages, starts a real gateway, and times a client paging through the
whole backlog over the WebSocket. Prints progress and a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import insert, update

from tests.harness import (
    ChatClient, Gateway, provision_embedded, provision_real, real_services_reachable, register_and_login,
)


def seed_backlog(storage, sender: int, recipient: int, count: int) -> None:
    """K stored messages in the recipient's stream, as persist would leave them."""
    from app.chat.conversations import private_conversation_id
    from models import Message, SyncEntry, User

    conv = private_conversation_id(sender, recipient)
    base_id, now = int(time.time() * 1000) << 22, int(time.time() * 1000)
    batch = 2000
    with storage.session() as session:
        for start in range(0, count, batch):
            n = min(batch, count - start)
            session.execute(insert(Message), [{
                "id": base_id + start + i, "conversation_id": conv, "sender_id": sender, "receiver_id": recipient,
                "client_msg_id": f"bench-{start + i}", "message_type": "text",
                "content": f"backlog message {start + i} " + "x" * 60, "extra": None, "is_group": False,
                "timestamp": now, "status": 0} for i in range(n)])
            session.execute(insert(SyncEntry), [{
                "user_id": recipient, "seq": start + i + 1, "message_id": base_id + start + i,
                "conversation_id": conv, "kind": 0} for i in range(n)])
        session.execute(update(User).where(User.id == recipient).values(inbox_seq=count))


def time_sync(gateway, user, limit: int, expected: int) -> tuple[float, int]:
    client = ChatClient(gateway.ws, user.token)
    seen, cursor, pages = set(), None, 0
    start = time.perf_counter()
    while True:
        client.send_json({"type": "sync", "cursor": cursor, "limit": limit})
        batch = client.next_frame(lambda f: f["type"] == "sync_batch", timeout=60)
        pages += 1
        for entry in batch["messages"]:
            if entry["msg_id"] in seen:
                raise SystemExit(f"duplicate {entry['msg_id']} in the sync stream")
            seen.add(entry["msg_id"])
        cursor = batch["cursor"]
        if not batch["has_more"]:
            break
    elapsed = time.perf_counter() - start
    client.close()
    if len(seen) != expected:
        raise SystemExit(f"synced {len(seen)} messages, expected {expected}")
    return elapsed, pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=500, help="page size (at most 500)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    args = parser.parse_args()

    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-"))
    services = provision_real(uuid.uuid4().hex[:10]) if kind == "real" else provision_embedded("bench", tmp)
    gateway = None
    try:
        import os

        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV")})
        from app.config import Settings
        from app.storage import Storage, upgrade_schema

        upgrade_schema(services.database_url)
        storage = Storage(Settings.from_env())
        gateway = Gateway("bench", services, tmp)
        sender, recipient = register_and_login(gateway.http), register_and_login(gateway.http)
        print(f"seeding {args.messages} messages ({kind} services)...", flush=True)
        seed_backlog(storage, int(sender.user_id), int(recipient.user_id), args.messages)
        times = []
        for run in range(1, args.runs + 1):
            elapsed, pages = time_sync(gateway, recipient, args.limit, args.messages)
            times.append(elapsed)
            print(f"run {run}/{args.runs}: {args.messages} messages in {pages} pages, {elapsed:.2f} s", flush=True)
        summary = {"bench": "sync", "services": kind, "messages": args.messages, "limit": args.limit,
                   "seconds_median": round(statistics.median(times), 3), "seconds_best": round(min(times), 3),
                   "messages_per_second": round(args.messages / statistics.median(times))}
        print(json.dumps(summary))
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        services.close()


if __name__ == "__main__":
    sys.exit(main())
