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

# Debian packages the test command needs, installed with apt-get as root.
# A package install may try to start its service (prometheus does): a policy-rc.d
# that answers 101 forbids that for the duration of the install.
apt_install() {  # apt_install WHAT [APT-GET OPTION...] PACKAGE...
  local what=$1; shift
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$what: run 'apt-get install -y $*' as root" >&2
    return 1
  fi
  local apt_log policy=/usr/sbin/policy-rc.d saved="" rc=0 packages
  packages=$(printf '%s\n' "$@" | grep -v '^-' | paste -sd' ')
  echo "installing Debian's $packages for $what (apt-get)" >&2
  apt_log=$(mktemp)
  if [ -e "$policy" ]; then saved=$(mktemp) && cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\n# scripts/bootstrap.sh: no service starts during its installs\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "$@" >"$apt_log" 2>&1; then
    apt-get update -q >>"$apt_log" 2>&1 || true
    apt-get install -y -q "$@" >>"$apt_log" 2>&1 || rc=$?
  fi
  if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
  if [ "$rc" != 0 ]; then
    tail -n 20 "$apt_log" >&2
    echo "could not install $packages with apt-get (output above)" >&2
  fi
  rm -f "$apt_log"
  return "$rc"
}

# The browser tests (tests/browser) drive Debian's Chromium; Playwright never downloads
# a browser here. scripts/test.sh asks for it with NETHERLINK_NEEDS_BROWSER=1;
# NETHERLINK_BROWSER=skip leaves it out (the browser tests then fail, saying why).
if [ "${NETHERLINK_NEEDS_BROWSER:-0}" = 1 ] && [ "${NETHERLINK_BROWSER:-}" != skip ] && [ ! -x /usr/bin/chromium ]; then
  apt_install "the browser tests (or set NETHERLINK_BROWSER=skip to run without them)" chromium chromium-driver \
    || exit 1
  [ -x /usr/bin/chromium ] || { echo "apt-get installed chromium but /usr/bin/chromium is missing" >&2; exit 1; }
fi

# tests/test_metrics.py checks the alert rules and their unit tests with promtool (Debian's
# prometheus package). scripts/test.sh asks for it with NETHERLINK_NEEDS_PROMTOOL=1;
# NETHERLINK_PROMTOOL=skip leaves it out (that test then fails, saying why).
if [ "${NETHERLINK_NEEDS_PROMTOOL:-0}" = 1 ] && [ "${NETHERLINK_PROMTOOL:-}" != skip ] \
   && ! command -v promtool >/dev/null 2>&1; then
  apt_install "the alert rule tests (or set NETHERLINK_PROMTOOL=skip to run without them)" \
    --no-install-recommends prometheus || exit 1
  command -v promtool >/dev/null 2>&1 || { echo "apt-get installed prometheus but promtool is not on PATH" >&2; exit 1; }
fi
