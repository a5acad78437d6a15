#!/usr/bin/env bash
# Run every CPU benchmark (see bench/run_all.py); extra arguments are passed on, e.g. --smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m bench.run_all "$@"
