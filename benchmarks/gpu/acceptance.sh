#!/usr/bin/env bash
# GPU acceptance in one command, from the repository root (see benchmarks/gpu/acceptance.py --help):
#   bash benchmarks/gpu/acceptance.sh [--out DIR]
# Results go to --out, else $OUT, else benchmarks/results/<UTC date>-<gpu name>/; the project need not be installed.
# The Python: $PYTHON, else this checkout's .venv, else python3 (the machine's own, with torch and CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
exec "$PY" benchmarks/gpu/acceptance.py "$@"
