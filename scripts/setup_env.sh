#!/usr/bin/env bash
# Create (or reuse) the project virtual environment .venv and install the project into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. "baselines" or "test". Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-baselines}"
PY="${PYTHON:-python3}"
torch_build="${DUALNET_TORCH:-cpu}"
# a .venv without a working pip (made where python3-venv / ensurepip was missing) is made again
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  "$PY" -m venv --clear .venv || { echo "setup_env: cannot create .venv (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
. .venv/bin/activate
stamp=".venv/.dualnet-installed-$extras-$torch_build-$(cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, so no dependency can pull another build. Default: the CPU build from PyTorch's
  # CPU index (a local CPU wheel in pip's find-links is taken first where one exists); PyPI's
  # Linux torch is a CUDA build of several GB. DUALNET_TORCH=cuda: PyPI's default (CUDA) build.
  if [ "$torch_build" = "cuda" ]; then
    # an installed CPU build satisfies "torch==2.13.0": remove it first
    python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null \
      || python -m pip uninstall -y -q torch >/dev/null 2>&1 || true
    python -m pip install -q -c constraints.txt "torch==2.13.0"
  else
    python -m pip install -q -c constraints.txt "torch==2.13.0" \
      --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15
  fi
  python -m pip install -q -c constraints.txt -e ".[$extras]"
  python -c "import torch; print('torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
  touch "$stamp"
fi
