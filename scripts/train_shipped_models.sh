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
  for modality in mri ct us; do  # one packed copy of the data per modality, shared by its runs
    f16=""; [ "$modality" = us ] && f16="--float16"
    python scripts/pack_lr_data.py "$(config_of dualnet_$modality)" --out ".gpu/data_$modality" $f16
  done
  for run in $RUNS; do
    modality="${run##*_}"; kind="${run%%_*}"
    mkdir -p ".gpu/$run"
    # the packed config with this run's model (baseline configs differ from pretrain_* only there)
    sed "s/^model = \"dualnet\"/model = \"$kind\"/" ".gpu/data_$modality/config.toml" > ".gpu/$run/config.toml"
  done
  du -sh .gpu
elif [ "$what" = train ]; then
  out="${2:?OUTDIR}"
  mkdir -p "$out"
  export PYTHONPATH="$PWD/DualNetDenoise${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  workers="${WORKERS:-2}"
  for run in $RUNS; do
    [ -f ".gpu/$run/config.toml" ] || continue
    python -m dualnet.training.cli train --config ".gpu/$run/config.toml" --data-dir ".gpu/data_${run##*_}" \
      --out "$out/$run" --export "$out/$run/$run.safetensors" --workers "$workers" --quiet \
      ${BUDGET:+--time-budget "$BUDGET"} --device "${DEVICE:-auto}" \
      > "$out/$run.log" 2>&1 &
  done
  wait
  tail -n 3 "$out"/*.log
fi
