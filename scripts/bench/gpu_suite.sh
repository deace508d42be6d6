#!/usr/bin/env bash
# The GPU suite in one command, on one H100/H200 with its own PyTorch (see scripts/bench/gpu_suite.py for the parts):
#   bash scripts/bench/gpu_suite.sh [--only tests|train|trl|report] [--steps N] [--out DIR]
#   bash scripts/bench/gpu_suite.sh --tiny          # CPU, tiny model: checks the suite itself (CI runs this)
# Missing packages (deepspeed, liger-kernel, datasets, trl) come from .whl/ when one is missing and .whl/ holds wheels
# (scripts/bench/gpu_wheels.sh download, on a machine with PyPI), installed beside the machine's torch, never over it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONPATH="${GPU_SITE:-/tmp/gpu_suite_site}:${PYTHONPATH:-}"
PYTHON=$PY bash scripts/bench/gpu_wheels.sh ensure
export PYTHONUNBUFFERED=1
exec "$PY" scripts/bench/gpu_suite.py "$@"
