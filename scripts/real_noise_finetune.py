"""Does self-supervised fine-tuning on one REAL noisy scan improve on the pretrained model?

Data: ``real_noise/epi_5reps.nii.gz`` (5 repeated EPI volumes, 1.5 s apart; volumes 2-5 differ
only by independent real noise, volume 1 is not at steady state). Volume 2 (index 1) is the
noisy input; the mean of volumes 3-5 is an independent noisy reference r = s + n_r with
Var(n_r) = sigma^2 / 3. For any denoised f(v2), E|f - r|^2 = |f - s|^2 + sigma^2 / 3, so
``MSE(f, r) - sigma^2/3`` estimates the squared error against the unknown truth s without bias
(sigma^2 is estimated from the repeats as Var(v3 - v4) / 2, per voxel inside the head mask).
We report its square root (RMSE to truth, estimated) inside the head mask for: the noisy input,
the shipped MRI model, the same model fine-tuned on volume 2 alone (``dualnet finetune --frame 1``
defaults: no clean data, the Rician sigma from the frames' differences), run with and without
the SURE guard, and BM4D with the Rician transform.

    python scripts/real_noise_finetune.py [--steps 300] [--out out/real_noise]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from dualnet.api import denoise_volume  # noqa: E402
from dualnet.estimate import sigma_from_repeats  # noqa: E402
from dualnet.io import read_frames, read_volume  # noqa: E402
from dualnet.metrics import foreground_mask  # noqa: E402
from dualnet.modelfile import default_model_path  # noqa: E402
from dualnet.training.config import TrainConfig, config_dir  # noqa: E402
from dualnet.modelfile import read_card  # noqa: E402
from dualnet.training.trainer import finetune  # noqa: E402


LOSS_NAMES = {"l2": "Noise2Void masking", "l1": "Noise2Void masking, L1", "sure": "SURE"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real_noise" / "epi_5reps.nii.gz"))
    ap.add_argument("--model", default=str(default_model_path("mri")))
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: configs/finetune.toml)")
    ap.add_argument("--out", default=str(REPO / "out" / "real_noise"))
    ap.add_argument("--losses", nargs="*", default=["l2", "sure"], choices=sorted(LOSS_NAMES),
                    help="self-supervised fine-tuning objectives to compare (ss_loss); none: no fine-tuning")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vols = [read_volume(args.data, frame=t) for t in range(5)]
    x = vols[1]
    x.array = x.array.astype(np.float32)
    reps = np.stack([v.array.astype(np.float32) for v in vols[2:]])
    ref = reps.mean(0)
    mask = foreground_mask(ref, "mri")
    sigma2 = float(np.var((reps[0] - reps[1])[mask]) / 2)

    def rmse_to_truth(f: np.ndarray) -> float:
        mse = float(np.mean((f - ref)[mask] ** 2)) - sigma2 / 3
        return float(np.sqrt(max(mse, 0.0)))

    rows = {"noisy input (volume 2)": {"rmse_truth_est": rmse_to_truth(x.array), "seconds": 0.0}}

    def run(name, **kw):
        t = time.perf_counter()
        f = denoise_volume(x, modality="mri", **kw).volume.array
        rows[name] = {"rmse_truth_est": rmse_to_truth(f), "seconds": round(time.perf_counter() - t, 2)}
        print(name, rows[name], flush=True)

    # what `dualnet denoise epi_5reps.nii.gz out.nii.gz --frame 1` does: the Rician sigma from the
    # differences between the series' frames (a single-image estimate is fooled by this EPI's ghosted
    # background and fine anatomy), and the network's SURE guard
    sigma_frames, _ = sigma_from_repeats(read_frames(args.data, 1))
    run("DUAL-NET shipped, noise estimated from volume 2 alone (guard on)", method="dualnet", model=args.model,
        device="cpu")
    run("DUAL-NET shipped, sigma from the frames, no guard", method="dualnet", model=args.model, device="cpu",
        sigma=sigma_frames, guard=False)
    run("DUAL-NET shipped, sigma from the frames + SURE guard (the default of `--frame 1`)", method="dualnet",
        model=args.model, device="cpu", sigma=sigma_frames)
    run("DUAL-NET shipped, sigma from the frames + SURE guard, one view (`--views 1`)", method="dualnet",
        model=args.model, device="cpu", sigma=sigma_frames, views=1)
    base_cfg = TrainConfig.from_toml(config_dir() / "finetune.toml")
    if args.steps:
        base_cfg = base_cfg.replace(steps=args.steps)
    for loss in args.losses:
        cfg = base_cfg.replace(device="cpu", ss_loss=loss)
        if loss == "sure":  # SURE already estimates the MSE to the truth: no pull toward the base
            cfg = cfg.replace(lambda_anchor=0.0, lambda_consistency=0.0, lambda_tv=0.0)
        name = f"DUAL-NET fine-tuned on volume 2 ({LOSS_NAMES[loss]}, sigma from the frames)"
        t = time.perf_counter()
        ft = out / f"dualnet_mri_epi_ft_{loss}.safetensors"
        # what `dualnet finetune epi_5reps.nii.gz --frame 1` does: the sigma from the frames
        finetune([(x.array, x.spacing_zyx)], args.model, ft, cfg, out_dir=out / f"ft_run_{loss}",
                 sigma=sigma_frames)
        ft_seconds = time.perf_counter() - t
        run(name + ", no guard", method="dualnet", model=str(ft), device="cpu", sigma=sigma_frames, guard=False)
        run(name + " + SURE guard", method="dualnet", model=str(ft), device="cpu", sigma=sigma_frames)
        check = read_card(ft).get("finetune_check", {})  # the whole-scan check: which model was written
        for suffix in (", no guard", " + SURE guard"):
            rows[name + suffix]["finetune_seconds"] = round(ft_seconds, 1)
            rows[name + suffix]["finetune_check"] = {k: check.get(k) for k in ("kept", "mse", "mse_input", "reason")
                                                     if k in check}
    run("BM4D + Rician VST, noise estimated from volume 2 alone", method="bm4d")
    run("BM4D + Rician VST, sigma from the frames (the default of `--frame 1`)", method="bm4d", sigma=sigma_frames)
    result = {"data": "real_noise/epi_5reps.nii.gz (neurolabusc/dcm_qa_sag, BSD-2-Clause)",
              "sigma_est": float(np.sqrt(sigma2)), "sigma_from_frames": sigma_frames,
              "mask_voxels": int(mask.sum()), "steps": base_cfg.steps,
              "metric": "sqrt(MSE(f, mean(vol3..5)) - sigma^2/3) inside the head mask (image units)",
              "rows": rows}
    (out / "real_noise.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"\nreal EPI noise sigma ~ {np.sqrt(sigma2):.2f}; RMSE to truth (estimated, head mask):")
    print("| method | RMSE to truth (est.) | seconds |\n|---|---|---|")
    for name, r in rows.items():
        kept = r.get("finetune_check", {}).get("kept")
        print(f"| {name} | {r['rmse_truth_est']:.3f} | {r['seconds']:.1f} |" + (f" kept: {kept}" if kept else ""))


if __name__ == "__main__":
    main()
