#!/usr/bin/env bash
# README command 2: install the project with its test dependencies and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 PYTHONUTF8=1
# one thread per test worker: the workers already use every core
export OMP_NUM_THREADS=1 DUALNET_NUM_THREADS=1
python -m pytest -q -n "${DUALNET_TEST_WORKERS:-2}" --durations=15 "$@"
