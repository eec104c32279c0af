#!/usr/bin/env bash
# Train the shipped models on the 2-core CPU, in the background, resumably:
#   nohup bash scripts/train_cpu.sh [VERSION] > runs/train.log 2>&1 &
# VERSION current (default): configs/pretrain_<m>.toml, each continuing the model its init_from names
# (the CT v13 continues weights/history/dualnet_ct_v13a, whose from-scratch stage is
# configs/history/pretrain_ct_v13a.toml); an older VERSION: configs/history/pretrain_<m>_<VERSION>.toml
# (the CT stage 1 of v3 is configs/history/pretrain_ct_v3a.toml).
# MRI on one core; CT then ultrasound on the other. Each run has a hard wall-clock budget
# (time_budget_s in its config), checkpoints every 250 steps and resumes from runs/<VERSION>_<m>/checkpoint.pt
# when started again (a new budget then applies to the continued run). Exported models:
# runs/<VERSION>_<m>/model.safetensors (+ .json card); copy them to DualNetDenoise/dualnet/weights/dualnet_<m>.*
set -uo pipefail
cd "$(dirname "$0")/.."
version="${1:-current}"
config() {  # modality
  if [ "$version" = current ]; then echo "DualNetDenoise/dualnet/configs/pretrain_$1.toml"
  else echo "DualNetDenoise/dualnet/configs/history/pretrain_$1_$version.toml"; fi
}
train() {  # modality
  local out="runs/${version}_$1" resume=()
  [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  .venv/bin/dualnet train --config "$(config "$1")" --out "$out" --quiet "${resume[@]}" \
    > "runs/${version}_$1.log" 2>&1
  echo "$(date -u +%FT%TZ) $1 finished with exit code $?"
}
train mri &
{ train ct; train us; } &
wait
