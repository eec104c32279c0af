#!/usr/bin/env bash
# README command 2: install the project with its test dependencies and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1
python -m pytest -q -n "${DUALNET_TEST_WORKERS:-2}" --durations=15 "$@"
