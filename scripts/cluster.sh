#!/usr/bin/env bash
# A production-shaped cluster on this machine (DESIGN §9): 3 RabbitMQ nodes, Redis with
# Sentinel, a MariaDB replica. `up`, `down`, `status` (prints the env lines to export).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m scripts.cluster "$@"
