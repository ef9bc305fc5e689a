# Sourced by scripts/run.sh and scripts/test.sh: make .venv and install requirements-dev.lock
# (the hashed lock of requirements-dev.txt, which includes requirements.txt) into it when a
# lock changed. Needs Python 3.11 with venv. The locks are made by scripts/lock.sh.
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "NetherLink needs Python 3.11 (found: $("$PYTHON" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
# A pin edited in requirements*.txt without 'bash scripts/lock.sh' would be silently ignored.
"$PYTHON" - <<'PY' || exit 1
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#\\]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out
for wanted, lock in (("requirements.txt", "requirements.lock"), ("requirements-dev.txt", "requirements-dev.lock")):
    locked = pins(lock)
    stale = [f"{n}=={v}" for n, v in pins(wanted).items() if locked.get(n) != v]
    if stale:
        sys.exit(f"{lock} does not match {wanted} ({', '.join(stale)}): run 'bash scripts/lock.sh'")
PY
if [ ! -x .venv/bin/python ]; then
  echo "creating virtualenv .venv" >&2
  "$PYTHON" -m venv .venv || { echo "could not create a virtualenv: on Debian/Ubuntu run 'apt-get install python3.11-venv'" >&2; exit 1; }
fi
want=$(cat requirements.lock requirements-dev.lock | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.requirements.sha256 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "installing requirements-dev.lock into .venv" >&2
  # --require-hashes: every file pip fetches must be the one the lock names.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
  echo "$want" > .venv/.requirements.sha256
fi

# The browser tests (tests/browser) drive Debian's Chromium; Playwright never downloads
# a browser here. scripts/test.sh asks for it with NETHERLINK_NEEDS_BROWSER=1;
# NETHERLINK_BROWSER=skip leaves it out (the browser tests then fail, saying why).
if [ "${NETHERLINK_NEEDS_BROWSER:-0}" = 1 ] && [ "${NETHERLINK_BROWSER:-}" != skip ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "the browser tests need Debian's Chromium: run 'apt-get install -y chromium chromium-driver' as root" \
         "(or set NETHERLINK_BROWSER=skip to run without it)" >&2
    exit 1
  fi
  echo "installing Debian's chromium and chromium-driver for the browser tests (apt-get)" >&2
  apt_log=$(mktemp)
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q chromium chromium-driver >"$apt_log" 2>&1; then
    apt-get update -q >>"$apt_log" 2>&1 || true
    if ! apt-get install -y -q chromium chromium-driver >>"$apt_log" 2>&1; then
      tail -n 20 "$apt_log" >&2
      echo "could not install chromium with apt-get (output above): the browser tests cannot run" >&2
      exit 1
    fi
  fi
  rm -f "$apt_log"
  [ -x /usr/bin/chromium ] || { echo "apt-get installed chromium but /usr/bin/chromium is missing" >&2; exit 1; }
fi
