#!/usr/bin/env bash
# Train the shipped models (DUAL-NET per modality, plus the DnCNN / Noise2Void baselines used by
# the evaluation study) with the project's own `dualnet train`.
#
#   scripts/train_shipped_models.sh pack            # here: pack clean low-resolution data into .gpu/
#   scripts/train_shipped_models.sh train OUTDIR    # there (GPU machine, PYTHONPATH=DualNetDenoise):
#                                                   # all runs in parallel, ~8 min each
#
# `pack` runs scripts/pack_lr_data.py on each config: the deterministic blur + downsampling is done
# once here, training then uses lr_factor = 1 (noise on the fly), which gives the same pairs as
# `dualnet train --config DualNetDenoise/dualnet/configs/pretrain_<modality>.toml` on the files.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:?pack|train}"
RUNS="${RUNS:-dualnet_mri dualnet_ct dualnet_us dncnn_mri n2v_mri dncnn_ct n2v_ct dncnn_us n2v_us}"

config_of() {  # run name -> config file
  local name="$1" kind="${1%%_*}" modality="${1##*_}"
  if [ "$kind" = dualnet ]; then echo "DualNetDenoise/dualnet/configs/pretrain_${modality}.toml";
  else echo "DualNetDenoise/dualnet/configs/baseline_${kind}_${modality}.toml"; fi
}

if [ "$what" = pack ]; then
  . .venv/bin/activate
  rm -rf .gpu
  for run in $RUNS; do  # each run packs its own config's data: the baselines train on theirs (as their cards say)
    modality="${run##*_}"
    f16=""; [ "$modality" = us ] && f16="--float16"
    python scripts/pack_lr_data.py "$(config_of "$run")" --out ".gpu/data_$run" $f16
    mkdir -p ".gpu/$run"
    cp ".gpu/data_$run/config.toml" ".gpu/$run/config.toml"
  done
  du -sh .gpu
elif [ "$what" = train ]; then
  out="${2:?OUTDIR}"
  mkdir -p "$out"
  export PYTHONPATH="$PWD/DualNetDenoise${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  workers="${WORKERS:-2}"
  for run in $RUNS; do
    [ -f ".gpu/$run/config.toml" ] || continue
    python -m dualnet.training.cli train --config ".gpu/$run/config.toml" --data-dir ".gpu/data_$run" \
      --out "$out/$run" --export "$out/$run/$run.safetensors" --workers "$workers" --quiet \
      ${BUDGET:+--time-budget "$BUDGET"} --device "${DEVICE:-auto}" \
      > "$out/$run.log" 2>&1 &
  done
  wait
  tail -n 3 "$out"/*.log
fi
