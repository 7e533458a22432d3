#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): InternVL2.5-1B's architecture with random weights on one
# CUDA GPU, ours against TRL 1.16, in under 8 minutes; prints one JSON line. Exit status 2 without
# CUDA, 1 when a row failed (its error is in the line).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "$PYTHON" in */*) export PATH="$(dirname "$PYTHON"):$PATH" ;; esac  # that environment's deepspeed
exec "$PYTHON" scripts/gpu_check.py "$@"
