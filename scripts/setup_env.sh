#!/usr/bin/env bash
# Create (or reuse) the project virtual environment .venv and install the project into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. "baselines" or "test". Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-baselines}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.dualnet-installed-$extras-$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned to the CPU build, so no dependency can pull a CUDA build.
  python -m pip install -q -c constraints.txt "torch==2.13.0"
  python -m pip install -q -c constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
