#!/usr/bin/env bash
# README command 1: install, then degrade the bundled real T1 scan to 2 mm with Rician noise,
# denoise it with the shipped DUAL-NET model and BM4D, and write the results, metrics and a PNG
# to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh baselines
. .venv/bin/activate
dualnet demo --out out/demo "$@"
