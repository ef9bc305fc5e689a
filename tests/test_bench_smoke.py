"""A seconds-long run of every bench/ tool: it exits 0, ends with its JSON summary, and loses nothing.

Not the benchmarks (docs/benchmarks.md has those and their commands): tiny
parameters, so that a change that breaks a tool, or makes it lose or
duplicate a message, fails CI. Each tool provisions its own database, vhost
and Redis db and starts its own processes, so they run two at a time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.harness import ROOT

# Longest first, so that the two lanes finish close together.
TOOLS = {
    "load": ["--users", "4", "--gateways", "2", "--rate", "20", "--seconds", "3", "--drain-timeout", "30"],
    "group_fanout": ["--members", "20", "--messages", "2"],
    "flood": ["--seconds", "2"],
    "conns": ["--connections", "200", "--heartbeat-interval", "1", "--window", "3"],
    "push": ["--users", "50", "--concurrency", "2"],
    "baseline": ["--messages", "200", "--rows", "100", "--batched-rows", "1000", "--redis-ops", "500",
                 "--redis-pipelined", "2000", "--chain-messages", "50", "--chain-concurrency", "1"],
    "sync": ["--messages", "500", "--runs", "1"],
    "search": ["--messages", "2000", "--runs", "2"],
    "media": ["--uploads", "2", "--mib", "1"],
}
TIMEOUT = 150


def run_tool(name: str, args: list[str], log_dir) -> tuple[int, str]:
    """Run `python -m bench.<name>`; on a timeout, interrupt it (its cleanup runs), then kill it."""
    log = log_dir / f"bench-{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            code = f"timed out after {TIMEOUT} s"
    return code, log.read_text(errors="replace")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Future]:
    log_dir = tmp_path_factory.mktemp("bench-smoke")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run_tool, name, args, log_dir) for name, args in TOOLS.items()}
    yield futures
    pool.shutdown(wait=True)


def summary_of(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary line; output ends with:\n{output[-3000:]}")


@pytest.mark.parametrize("name", list(TOOLS))
def test_bench_tool_runs_and_loses_nothing(runs, name):
    code, output = runs[name].result()
    assert code == 0, f"bench.{name} exited with {code}; output ends with:\n{output[-3000:]}"
    summary = summary_of(output)
    assert summary["bench"] == name
    for key in ("lost", "duplicated"):
        if key in summary:
            assert summary[key] == 0, f"bench.{name}: {key} = {summary[key]}\n{output[-3000:]}"
    assert summary.get("ok", True) is True, output[-3000:]
