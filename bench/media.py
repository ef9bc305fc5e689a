"""Upload throughput and gateway memory: `python -m bench.media --uploads 10 --mib 25`.

Provisions its own services (like the tests), starts one real gateway with
its own MEDIA_ROOT, and has N users upload an N-MiB file each at the same
time (`POST /api/media`, application/octet-stream, distinct random bytes),
while the gateway's processes' resident memory is sampled every 50 ms.
Prints MB/s over the wall time, the peak and baseline RSS, and a JSON summary.
Uploads are streamed to disk, so the peak should stay far below N × size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from bench import close_run, open_run
from tests.harness import Gateway, register_and_login

MIB = 1024 * 1024


def _rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=10, help="concurrent uploads, one user each")
    parser.add_argument("--mib", type=int, default=25, help="size of each upload (at most MEDIA_MAX_BYTES)")
    parser.add_argument("--services", choices=["auto", "real", "embedded"], default="auto")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    kind, tmp, services = open_run(args.services, "media")
    gateway, ok = None, False
    try:
        from app.storage import upgrade_schema

        upgrade_schema(services.database_url)
        gateway = Gateway("bench", services, tmp, MEDIA_ROOT=str(tmp / "media"), MEDIA_UPLOAD_RATE_PER_MINUTE="0")
        users = [register_and_login(gateway.http) for _ in range(args.uploads)]
        bodies = [os.urandom(args.mib * MIB) for _ in users]
        baseline = _rss(gateway.proc.pid)
        peak, sampling = [baseline], threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], _rss(gateway.proc.pid))
                time.sleep(0.05)

        def upload(i: int) -> tuple[int, int]:
            r = requests.post(f"{gateway.http}/api/media", data=bodies[i], timeout=300,
                              headers={"Authorization": f"Bearer {users[i].token}",
                                       "Content-Type": "application/octet-stream"})
            return r.status_code, (r.json().get("size", 0) if r.status_code == 201 else 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"{args.uploads} concurrent uploads of {args.mib} MiB ({kind} services)...", flush=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.uploads) as pool:
            results = list(pool.map(upload, range(args.uploads)))
        elapsed = time.perf_counter() - start
        sampling.set()
        sampler.join()
        stored = sum(size for status, size in results if status == 201)
        failed = [status for status, _ in results if status != 201]
        summary = {"bench": "media", "services": kind, "uploads": args.uploads, "mib_each": args.mib,
                   "seconds": round(elapsed, 2), "mb_per_second": round(stored / elapsed / 1e6, 1),
                   "gateway_rss_baseline_mib": round(baseline / MIB, 1),
                   "gateway_rss_peak_mib": round(peak[0] / MIB, 1), "failed": failed}
        print(f"stored {stored / MIB:.0f} MiB in {elapsed:.2f} s ({summary['mb_per_second']} MB/s); gateway RSS "
              f"{summary['gateway_rss_baseline_mib']} MiB before, peak {summary['gateway_rss_peak_mib']} MiB",
              flush=True)
        print(json.dumps(summary))
        ok = not failed
        return 0 if ok else 1
    finally:
        if gateway is not None:
            gateway.stop()
        close_run(services, tmp, ok, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
