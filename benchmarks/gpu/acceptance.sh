#!/usr/bin/env bash
# GPU acceptance in one command (see benchmarks/gpu/acceptance.py --help): exports, builds engines where
# TensorRT is installed, verifies every GPU backend and benchmarks them; results in benchmarks/results/<UTC date>-<gpu name>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu/acceptance.py "$@"
