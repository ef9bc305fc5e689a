#!/usr/bin/env bash
# Regenerate the hashed locks from requirements.txt and requirements-dev.txt:
#   bash scripts/lock.sh             keep every locked version that still fits
#   bash scripts/lock.sh --upgrade   move unpinned dependencies to their newest releases
# Needs pip-tools 7.x on PATH or in .venv (pip install 'pip-tools>=7.1,<8'); it is no
# requirement of the project. The dev lock is constrained by the servers' lock so that
# tests run the very versions the production image installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_COMPILE=$(command -v pip-compile || echo .venv/bin/pip-compile)
[ -x "$PIP_COMPILE" ] || { echo "pip-compile not found: pip install 'pip-tools>=7.1,<8'" >&2; exit 1; }
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
# No index or find-links lines: a lock must not carry one machine's package sources.
opts=(--quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host "$@")
"$PIP_COMPILE" "${opts[@]}" --output-file requirements.lock requirements.txt
"$PIP_COMPILE" "${opts[@]}" --constraint requirements.lock --output-file requirements-dev.lock requirements-dev.txt
