"""Benchmarks (`python -m bench.<name> --help`); each prints a JSON summary line."""
from __future__ import annotations

import shutil
import sys


def close_run(services, tmp, ok: bool, keep_logs: bool) -> None:
    """The end of every bench run: the services' test resources dropped, and the process logs
    removed after a good run (kept, and their place said, after a bad one or with --keep-logs)."""
    services.close()
    if ok and not keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs kept in {tmp}", file=sys.stderr)
