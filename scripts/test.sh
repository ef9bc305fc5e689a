#!/usr/bin/env bash
# Run the test suite: against RabbitMQ, MariaDB/MySQL and Redis on 127.0.0.1
# when they are reachable, on embedded defaults (SQLite, bundled Redis) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
