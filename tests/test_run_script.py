"""scripts/run.sh from a fresh clone, the README's way, with the three service URLs set."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests
import websocket

from tests.harness import ROOT, free_port, provision_real, real_services_reachable, register_and_login


def _venv_view(source, target) -> None:
    """The clone's .venv: the installed packages of this checkout's, seen through symlinks, with
    the requirements marker of the clone's own files, so that bootstrap installs nothing (no network)."""
    target.mkdir()
    for entry in os.listdir(source):
        if not entry.startswith("."):
            (target / entry).symlink_to(source / entry)
    (target / "bin").unlink()
    (target / "bin").mkdir()
    for entry in os.listdir(source / "bin"):
        (target / "bin" / entry).symlink_to(source / "bin" / entry)
    want = subprocess.run("cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1", shell=True,
                          cwd=target.parent, capture_output=True, text=True, check=True).stdout.strip()
    (target / ".requirements.sha256").write_text(want + "\n")


@pytest.fixture
def clone(tmp_path):
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    path = tmp_path / "netherlink"
    subprocess.run(["git", "clone", "--quiet", "--branch", branch, str(ROOT), str(path)], check=True, timeout=120)
    assert not (path / "var").exists()  # what broke: var/ was made only for the embedded defaults
    _venv_view((ROOT / ".venv").resolve(), path / ".venv")
    return path


def test_run_sh_on_a_fresh_clone_with_the_service_urls_serves_a_message(services, clone, tmp_path):
    if services.kind != "real" or not real_services_reachable():
        pytest.skip("needs MySQL, RabbitMQ and Redis")
    own = provision_real(uuid.uuid4().hex[:10])
    port, flower = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "REDIS_URL")}
    env.update(DATABASE_URL=own.database_url, BROKER_URL=own.broker_url, REDIS_URL=own.redis_url,
               PYTHON=sys.executable if sys.version_info[:2] == (3, 11) else "python3.11")
    out = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(["bash", "scripts/run.sh", "--gateways", "2", "--port", str(port), "--flower-port",
                             str(flower), "--worker-metrics-port", "0"], cwd=clone, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "NetherLink is running" not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None, f"run.sh exited:\n{(tmp_path / 'run.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"run.sh not up:\n{(tmp_path / 'run.log').read_text()[-3000:]}"
            time.sleep(0.5)
        gw1, gw2 = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
        assert requests.get(f"{gw2}/healthz", timeout=5).status_code == 200
        alice, bob = register_and_login(gw1), register_and_login(gw1)
        b = websocket.create_connection(f"ws://127.0.0.1:{port + 1}/ws?token={bob.token}", timeout=20)
        a = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?token={alice.token}", timeout=20)
        try:
            assert json.loads(a.recv())["type"] == json.loads(b.recv())["type"] == "hello"
            a.send(json.dumps({"type": "send", "client_msg_id": "fresh-clone", "to": bob.user_id,
                               "content": "hello from a fresh clone"}))
            ack = json.loads(a.recv())
            assert ack["type"] == "ack", ack
            message = json.loads(b.recv())
            assert (message["type"], message["msg_id"], message["content"]) == \
                ("message", ack["msg_id"], "hello from a fresh clone")
        finally:
            a.close()
            b.close()
        assert proc.poll() is None, "a process of run.sh stopped"  # beat included
        assert (clone / "var").is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # run.sh's own group: it stops its children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        out.close()
        own.close()
