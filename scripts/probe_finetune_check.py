#!/usr/bin/env python
"""Diagnostic (not a test): is the whole-scan check after CT fine-tuning misled by the noise estimate?

For each slab of a CT subset of the evaluation study (default ``ct_abdomen``), degraded as
``dualnet evaluate`` degrades it (same seeds) at ``--level`` (dose fraction): the shipped CT model
(the base) and the model fine-tuned on the noisy slab with the study's per-case recipe
(``[methods.dualnet_ft]``: its steps and overrides of ``configs/finetune.toml``) are scored against the
reference (whole / foreground PSNR, the subset's data range). The check (``dualnet.training.base_check``)
is run twice: with the noise model the fine-tuning estimated from the slab, as ``dualnet finetune``
runs it, and with the simulation's own Poisson-Gaussian model. The estimated gain is printed beside
the simulated one. A third fine-tuning is given the simulated noise std at water as a user gives it
(``dualnet finetune --sigma``: the slab's own fit keeps the shape), and is scored and checked the same
way. With ``--denoised-reference`` the source volume is first denoised by the shipped model (its own
noise estimate), so that the reference carries little noise of its own.

    python scripts/probe_finetune_check.py [--level 0.25] [--subset ct_abdomen] [--denoised-reference]

docs/design_sweep.md, session 32, has a run. Fine-tuning is not bit-reproducible from run to run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from dualnet import api, evaluate, modelfile, noise  # noqa: E402
from dualnet.degrade import degrade  # noqa: E402
from dualnet.io import Volume, read_volume, write_volume  # noqa: E402
from dualnet.training import base_check  # noqa: E402
from dualnet.training.config import TrainConfig  # noqa: E402
from dualnet.training.data import variance_coef  # noqa: E402
from dualnet.training.trainer import finetune  # noqa: E402

STUDY = REPO / "DualNetDenoise" / "dualnet" / "configs" / "study.toml"


def denoise(arr: np.ndarray, spacing_zyx, model: Path) -> np.ndarray:
    """``dualnet denoise`` with ``model`` on a (z, y, x) array."""
    vol = Volume(np.asarray(arr, dtype=np.float32), tuple(reversed(tuple(spacing_zyx))))
    return api.denoise_volume(vol, method="dualnet", modality="ct", model=model, seed=0).volume.array


def fit(noisy: np.ndarray, spacing: Tuple[float, ...], base: Path, run_cfg: TrainConfig, out: Path,
        sigma: Optional[float] = None) -> Tuple[dict, Path]:
    """Fine-tune ``base`` on one slab as ``dualnet finetune [--sigma]`` does; returns the card (with its
    check) and the fine-tuned model itself (fitted again without the check when it kept the base)."""
    finetune([(noisy, spacing)], base, out, run_cfg, out_dir=out.with_suffix(".run"), sigma=sigma)
    card = modelfile.read_card(out)
    if card.get("finetune_check", {}).get("kept") != "base":
        return card, out
    tuned = out.with_name(out.stem + "_unchecked.safetensors")  # the check wrote the base there
    finetune([(noisy, spacing)], base, tuned, run_cfg.replace(base_check=0), out_dir=tuned.with_suffix(".run"),
             sigma=sigma)
    return card, tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", type=float, default=0.25, help="dose fraction of the full dose")
    ap.add_argument("--subset", default="ct_abdomen", help="a 3D CT [[subset]] of configs/study.toml")
    ap.add_argument("--denoised-reference", action="store_true",
                    help="denoise the source volume with the shipped model before cutting the slabs")
    args = ap.parse_args()

    cfg = evaluate.load_config(STUDY)
    subset = dict(next((s for s in cfg["subset"] if s["name"] == args.subset), {}))
    if subset.get("modality") != "ct" or "image" not in subset:
        sys.exit(f"{args.subset}: not a 3D CT subset of {STUDY}")
    data_dir = evaluate.find_data_dir(STUDY)
    base = api.resolve_model_path(None, "ct")
    method = dict(cfg.get("methods", {}).get("dualnet_ft", {}))
    gain, sigma_e = noise.ct_noise_parameters(args.level)
    simulated = variance_coef("ct", gain=gain, electronic_sigma=sigma_e)
    data_range = float(subset.get("data_range", 2000.0))
    work = Path(tempfile.mkdtemp(prefix="dualnet_check_probe_"))
    if args.denoised_reference:
        vol = read_volume(data_dir / subset["image"])
        res = api.denoise_volume(vol, method="dualnet", modality="ct", model=base)
        subset["image"] = str(work / "denoised_reference.nii.gz")
        write_volume(res.volume, subset["image"])
        subset.pop("labels", None)

    water = float(np.sqrt(simulated[0]))  # the simulated noise std at 0 HU
    print(f"level {args.level}: simulated gain {gain:.3f}, electronic sigma {sigma_e:.1f} HU, std at water "
          f"{water:.1f} HU{'; denoised reference' if args.denoised_reference else ''}")
    print("| slab | base whole / fg (dB) | fine-tuned whole / fg (dB) | estimated gain | check, estimated model "
          "| check, simulated model | fine-tuned with --sigma, whole / fg (dB) | its check |\n"
          "|---|---|---|---|---|---|---|---|")
    for case in evaluate.load_cases(subset, data_dir):
        seed = evaluate.case_seed(case.subset, case.case_id, args.level, 0)
        d = degrade(case.clean[0], "ct", args.level, lr_factor=subset.get("lr_factor", 2),
                    spacing_zyx=case.spacing_zyx, rng=seed)
        noisy, clean = d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float32)
        spacing = tuple(float(v) for v in d.spacing_lr_zyx)
        # the study's recipe for this case: its [methods.dualnet_ft] table over configs/finetune.toml
        run_cfg = evaluate.finetune_config(evaluate.MethodContext(
            "ct", spacing, args.level, seed, options=method, config_dir=STUDY.parent, device="cpu"))
        card, tuned = fit(noisy, spacing, base, run_cfg, work / f"{case.case_id}.safetensors")
        kept_est = card.get("finetune_check", {}).get("kept", "?")
        estimated_gain = float(card.get("finetune_noise_models", [{}])[0].get("gain", float("nan")))
        card_given, tuned_given = fit(noisy, spacing, base, run_cfg, work / f"{case.case_id}_given.safetensors",
                                      sigma=water)
        scores: Dict[str, str] = {}
        for name, path in (("base", base), ("tuned", tuned), ("given", tuned_given)):
            m = evaluate.image_metrics(clean, denoise(noisy, spacing, path), "ct", data_range)
            scores[name] = f"{m['psnr_all']:.2f} / {m['psnr_fg']:.2f}"
        runs = {"base": base_check.model_pipeline(base, "ct"), "finetuned": base_check.model_pipeline(tuned, "ct")}
        check = base_check.compare([base_check.Scan(case.case_id, noisy, simulated, spacing)], runs, "ct",
                                   seed=run_cfg.seed)
        print(f"| {case.case_id} | {scores['base']} | {scores['tuned']} | {estimated_gain:.3f} | {kept_est} "
              f"| {check['kept']} | {scores['given']} | {card_given.get('finetune_check', {}).get('kept', '?')} |",
              flush=True)


if __name__ == "__main__":
    main()
