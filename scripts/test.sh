#!/usr/bin/env bash
# Run the test suite: against RabbitMQ, MariaDB/MySQL and Redis on 127.0.0.1
# when they are reachable, on embedded defaults (SQLite, bundled Redis) otherwise.
# Installs Debian's chromium (for tests/browser) and prometheus (promtool, for the alert
# rules of tests/test_metrics.py) as root with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
NETHERLINK_NEEDS_BROWSER=1
NETHERLINK_NEEDS_PROMTOOL=1
. scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
