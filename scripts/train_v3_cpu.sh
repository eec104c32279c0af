#!/usr/bin/env bash
# Train the shipped v3 models on the 2-core CPU, in the background, resumably:
#   nohup bash scripts/train_v3_cpu.sh > runs/v3.log 2>&1 &
# MRI on one core; CT then ultrasound on the other. Each run has a hard wall-clock budget
# (time_budget_s in its config), checkpoints every 250 steps and resumes from runs/v3_<m>/checkpoint.pt
# when started again (a new budget then applies to the continued run). Exported models:
# runs/v3_<m>/model.safetensors (+ .json card); copy them to DualNetDenoise/dualnet/weights/dualnet_<m>.*
set -uo pipefail
cd "$(dirname "$0")/.."
train() {  # modality
  local out="runs/v3_$1" resume=()
  [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  .venv/bin/dualnet train --config "DualNetDenoise/dualnet/configs/pretrain_$1.toml" --out "$out" --quiet "${resume[@]}" \
    > "runs/v3_$1.log" 2>&1
  echo "$(date -u +%FT%TZ) $1 finished with exit code $?"
}
train mri &
{ train ct; train us; } &
wait
