"""Benchmarks (`python -m bench.<name> --help`); each prints a JSON summary line."""
from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from pathlib import Path


def open_run(choice: str, name: str):
    """The start of a bench run: (kind, temporary directory, services) for --services
    auto|real|embedded (auto: the real services when they answer on 127.0.0.1)."""
    from tests.harness import provision_embedded, provision_real, real_services_reachable

    kind = choice if choice != "auto" else ("real" if real_services_reachable() else "embedded")
    tmp = Path(tempfile.mkdtemp(prefix=f"nl-bench-{name}-"))
    services = provision_real(uuid.uuid4().hex[:10]) if kind == "real" else provision_embedded(f"bench-{name}", tmp)
    return kind, tmp, services


def close_run(services, tmp, ok: bool, keep_logs: bool) -> None:
    """The end of every bench run: the services' test resources dropped, and the process logs
    removed after a good run (kept, and their place said, after a bad one or with --keep-logs)."""
    services.close()
    if ok and not keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs kept in {tmp}", file=sys.stderr)
