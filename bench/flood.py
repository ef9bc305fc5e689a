"""Does a flooding user slow the others? `python -m bench.flood --seconds 10`.

Starts one gateway with the production rate-limit defaults, a persist and a
dispatch worker; a victim sends at a calm rate (--victim-rate) to a peer and
the bench records the victim's ack latency, first alone, then while a
flooder on the same gateway sends as fast as its socket allows. The flooder
gets `rate_limited` errors beyond its budget (and is cut off with 1008 if it
ignores them); what matters is the victim's latency in both phases. Prints
progress per phase and a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import websocket

from bench import close_run
from bench.load import ms, percentile
from tests.harness import (
    Gateway, Worker, provision_embedded, provision_real, real_services_reachable, register_and_login,
)

# The defaults of app/config.py, spelled out: the harness turns limits off unless told.
LIMITS = {"SEND_RATE_PER_SECOND": "10", "SEND_BURST": "50", "FRAME_RATE_PER_SECOND": "30", "FRAME_BURST": "120",
          "FLOOD_CLOSE_AFTER": "100", "CONNECT_RATE_PER_MINUTE": "0", "MAX_CONNECTIONS_PER_USER": "10",
          "LOGIN_RATE_PER_MINUTE": "0", "REGISTER_RATE_PER_MINUTE": "0"}


def victim_phase(gateway, victim, peer, rate: float, seconds: float) -> list[float]:
    """Send at `rate` for `seconds`; returns the ack latencies (s)."""
    ws = websocket.create_connection(f"{gateway.ws}?token={victim.token}", timeout=10)
    json.loads(ws.recv())
    latencies, deadline, seq = [], time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        cmid = f"v-{uuid.uuid4().hex[:12]}"
        sent = time.perf_counter()
        ws.send(json.dumps({"type": "send", "client_msg_id": cmid, "to": peer.user_id, "content": f"calm {seq}"}))
        while True:
            frame = json.loads(ws.recv())
            if frame.get("client_msg_id") == cmid:
                if frame["type"] != "ack":
                    raise RuntimeError(f"the victim was refused: {frame}")
                latencies.append(time.perf_counter() - sent)
                break
        seq += 1
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - sent)))
    ws.close()
    return latencies


def flood(gateway, flooder, peer, rate: float, stop: threading.Event, outcome: Counter) -> None:
    """Send `rate` frames/s (0: as fast as the socket takes them); count the answers; reconnect when cut off."""
    while not stop.is_set():
        ws = websocket.create_connection(f"{gateway.ws}?token={flooder.token}", timeout=10)
        json.loads(ws.recv())
        reader_done = threading.Event()

        def read():
            try:
                while True:
                    raw = ws.recv()
                    if not raw:
                        break
                    frame = json.loads(raw)
                    outcome[frame.get("code") or frame["type"]] += 1
            except Exception:
                pass
            reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            while not stop.is_set() and not reader_done.is_set():
                ws.send(json.dumps({"type": "send", "client_msg_id": uuid.uuid4().hex, "to": peer.user_id,
                                    "content": "flood"}))
                outcome["sent"] += 1
                if rate:
                    time.sleep(1 / rate)
        except Exception:
            outcome["cut_off"] += 1
        ws.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--victim-rate", type=float, default=5.0, help="the victim's messages per second")
    parser.add_argument("--flood-rate", type=float, default=500.0,
                        help="the flooder's frames per second (0: as fast as possible; on this same machine "
                             "that mostly measures the bench client eating the CPU the servers need)")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    args = parser.parse_args()
    kind = args.services if args.services != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-flood-"))
    services = provision_real(uuid.uuid4().hex[:10]) if kind == "real" else provision_embedded("bench-flood", tmp)
    procs, ok = [], False
    try:
        import os

        os.environ.update({k: v for k, v in services.env().items()
                           if k in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "NETHERLINK_ENV")})
        from app.storage import upgrade_schema

        upgrade_schema(services.database_url)
        print(f"starting a gateway with the default limits and two workers ({kind} services)...", flush=True)
        gateway = Gateway("gw1", services, tmp, **LIMITS)
        procs += [gateway, Worker("persist", "private_messages,group_messages", services, tmp),
                  Worker("dispatch", "offline_messages", services, tmp)]
        victim, flooder, peer = (register_and_login(gateway.http) for _ in range(3))

        print(f"phase 1: the victim alone, {args.victim_rate:g} msg/s for {args.seconds:g} s...", flush=True)
        calm = victim_phase(gateway, victim, peer, args.victim_rate, args.seconds)
        print(f"  ack p50 {ms(percentile(calm, 50))} ms, p99 {ms(percentile(calm, 99))} ms", flush=True)

        print(f"phase 2: the same while another user floods the same gateway "
              f"({args.flood_rate:g} frames/s)...", flush=True)
        stop, outcome = threading.Event(), Counter()
        flooding = threading.Thread(target=flood, args=(gateway, flooder, peer, args.flood_rate, stop, outcome),
                                    daemon=True)
        flooding.start()
        stormy = victim_phase(gateway, victim, peer, args.victim_rate, args.seconds)
        stop.set()
        flooding.join(15)
        print(f"  ack p50 {ms(percentile(stormy, 50))} ms, p99 {ms(percentile(stormy, 99))} ms; "
              f"flooder: {dict(outcome)}", flush=True)
        summary = {
            "bench": "flood", "services": kind, "seconds": args.seconds, "victim_rate": args.victim_rate,
            "flood_rate": args.flood_rate,
            "alone_ack_ms_p50": ms(percentile(calm, 50)), "alone_ack_ms_p99": ms(percentile(calm, 99)),
            "flooded_ack_ms_p50": ms(percentile(stormy, 50)), "flooded_ack_ms_p99": ms(percentile(stormy, 99)),
            "victim_refused": 0, "flooder_sent": outcome["sent"], "flooder_acked": outcome["ack"],
            "flooder_rate_limited": outcome["rate_limited"], "flooder_cut_off": outcome["cut_off"],
        }
        print(json.dumps(summary), flush=True)
        ok = True
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        close_run(services, tmp, ok, keep_logs=False)


if __name__ == "__main__":
    sys.exit(main())
