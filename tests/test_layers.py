"""The layer rule of docs/architecture.md, checked on the source: arrows only point down.

wire (ws/, app/http/, tasks/) -> domain (app/chat, app/accounts, app/push, app/media) -> leaf
modules (config, storage, errors, ids, wire, group_commit, ratelimit, metrics) and models.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = ("app/chat", "app/accounts", "app/push", "app/media")
LEAF = ("app/config.py", "app/storage.py", "app/errors.py", "app/ids.py", "app/wire.py", "app/group_commit.py",
        "app/ratelimit.py", "app/metrics.py")
WIRE_PACKAGES = ("flask", "werkzeug", "flask_sock", "celery", "kombu", "ws", "tasks", "app.http")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _files(*places: str) -> list[Path]:
    files = []
    for place in places:
        path = ROOT / place
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _breaks(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in files for line, module in _imports(path)
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_domain_modules_import_no_web_framework_queue_gateway_or_task_code():
    files = _files(*DOMAIN)
    assert len(files) > 15  # the check reads the real tree
    assert _breaks(files, WIRE_PACKAGES) == []


def test_leaf_modules_import_neither_the_domain_nor_the_wire_layer():
    assert _breaks(_files(*LEAF), WIRE_PACKAGES + ("app.chat", "app.accounts", "app.push")) == []


def test_the_gateway_loads_no_task_definitions():
    """The gateway publishes through tasks.publish; loading it (in a fresh interpreter, as the
    gateway does) loads no task module, so no worker code or provider preload runs there."""
    gateway = {module for path in _files("ws") for _, module in _imports(path)}
    assert {m for m in gateway if m.split(".")[0] == "tasks"} == {"tasks.publish"}
    probe = ("import sys, ws.gateway, tasks.publish; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'app')))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "NETHERLINK_ENV": "dev"}).stdout
    assert "tasks.publish" in loaded
    for module in ("tasks.messages", "tasks.push", "tasks.housekeeping", "app.push.providers.apns"):
        assert f"'{module}'" not in loaded


@pytest.mark.parametrize("path", _files(*DOMAIN, *LEAF), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_domain_or_leaf_module_writes_a_frame_type_of_its_own(path):
    """Frames are built in app/wire.py only: a `"type": "..."` dict literal elsewhere is a second copy."""
    if path.name == "wire.py":
        return
    literals = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "type"
                                                      for k in node.keys)]
    assert literals == [], f"{path.relative_to(ROOT)} builds a frame at line(s) {literals}"
