#!/usr/bin/env bash
# Run the whole system: gateway(s), a worker per queue family, beat, Flower.
# Uses DATABASE_URL / BROKER_URL / REDIS_URL when set, embedded defaults otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
exec .venv/bin/python -m scripts.run_system "$@"
