"""Measure models against BM4D on held-out validation data and record the numbers in their cards.

For each model the validation sources of its training config (``split = "val"``, never seen in
training) are degraded with ``dualnet.degrade`` (lr_factor 2, fixed seeds) at the issue's target
setting (MRI Rician 5 % of max, CT 25 % dose, ultrasound L = 4) and at any ``--levels`` given.
Every model and BM4D (with its modality transform; BM3D for 2D ultrasound frames) denoise the
same noisy images; PSNR / SSIM against the clean low-resolution image with data range = clean
max - min, on the whole image and on the foreground mask (``metrics.foreground_mask``); CT also
in the [-160, 240] HU window (both images clipped to the window, data range 400 HU). For
DUAL-NET also the NEB's noise map against the true noise std of the simulation and against the
input's whole noise, the simulated noise and the reference scan's own (ratios of the foreground
means) and its confidence map's foreground mean and spread. The case (volume, or 2D
image) is the unit; the tables give means over cases.

    python scripts/validate_models.py DualNetDenoise/dualnet/weights/dualnet_mri.safetensors \\
        --config DualNetDenoise/dualnet/configs/pretrain_mri.toml [--levels 0.02 0.05 0.1] [--no-write]

With several models (a design sweep) every model is scored on the same cases, BM4D once, and one
markdown table is printed (``--baseline none`` skips BM4D). The first level is written into the
card as ``metrics.validation``, all levels as ``metrics.validation_levels``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from dualnet.api import denoise_volume  # noqa: E402
from dualnet.degrade import degrade  # noqa: E402
from dualnet.io import Volume, atomic_write_bytes  # noqa: E402
from dualnet.metrics import foreground_mask, psnr, ssim  # noqa: E402
from dualnet.estimate import estimate_noise, input_noise_std_map  # noqa: E402
from dualnet.inference import denoise_array  # noqa: E402
from dualnet.modelfile import load_model, read_card, rewrite_card  # noqa: E402
from dualnet.noise import DEFAULT_LEVELS, noise_std_map  # noqa: E402
from dualnet.orthoviews import parse_views  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402
from dualnet.training.data import noise_variance_model, read_data_source  # noqa: E402

CT_WINDOW_HU = (-160.0, 240.0)
KEYS = ("psnr", "ssim", "psnr_fg", "ssim_fg", "bias_bg_pct")


def scores(ref: np.ndarray, out: np.ndarray, modality: str) -> dict:
    """PSNR / SSIM of ``out`` against ``ref``: whole image, foreground, and the CT window; the mean
    background error (``bias_bg_pct``)."""
    rng = float(ref.max() - ref.min())
    mask = foreground_mask(ref, modality)
    res = {"psnr": psnr(ref, out, data_range=rng), "ssim": ssim(ref, out, data_range=rng),
           "psnr_fg": psnr(ref, out, data_range=rng, mask=mask),
           "ssim_fg": ssim(ref, out, data_range=rng, mask=mask),
           # mean error outside the foreground, % of the data range (e.g. a Rician floor left in the air)
           "bias_bg_pct": float(np.mean((out - ref)[~mask]) / max(rng, 1e-12) * 100) if (~mask).any() else 0.0}
    if modality == "ct":
        lo, hi = CT_WINDOW_HU
        rw, ow = np.clip(ref, lo, hi), np.clip(out, lo, hi)
        res["psnr_win"] = psnr(rw, ow, data_range=hi - lo)
        res["ssim_win"] = ssim(rw, ow, data_range=hi - lo)
    return res


def neb_maps(res, true_std: np.ndarray, total_std: np.ndarray, fg: np.ndarray) -> dict:
    """The NEB's noise map against the simulated noise std and against the input's whole noise
    (the simulated noise and the reference scan's own, ``estimate.input_noise_std_map``), as ratios
    of the foreground means, and its confidence map's foreground mean and spread."""
    sig, alpha = res.sigma_map, res.alpha_map
    return {"neb_sigma_ratio_fg": float(np.mean(sig[fg]) / max(float(np.mean(true_std[fg])), 1e-12)),
            "neb_sigma_ratio_total_fg": float(np.mean(sig[fg]) / max(float(np.mean(total_std[fg])), 1e-12)),
            "alpha_mean_fg": float(np.mean(alpha[fg])), "alpha_std_fg": float(np.std(alpha[fg]))}


def validation_images(cfg, data_dir: str, max_cases: int, untouched: bool = False) -> list:
    """The config's validation images, at most ``max_cases`` of them, evenly spaced; with ``untouched``
    the others instead: the images no card, selection or default was ever scored on."""
    images = []
    for src in (s for s in cfg.data if s.split == "val"):
        images += read_data_source(src, data_dir)
    chosen = set(np.linspace(0, len(images) - 1, max_cases).round().astype(int)) if len(images) > max_cases \
        else set(range(len(images)))
    return [im for i, im in enumerate(images) if (i in chosen) != untouched]


def degraded_cases(images: list, modality: str, level: float, lr_factor: int):
    """``(degraded, name)`` for each validation image at ``level``: a one-slice 3D image as 2D,
    degraded with the seed ``1000 + its index``, so every run of a level sees the same inputs."""
    for k, (arr, spacing_zyx, name) in enumerate(images):
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr, spacing_zyx = arr[0], tuple(spacing_zyx)[1:]
        yield degrade(arr, modality, level, lr_factor=lr_factor, spacing_zyx=spacing_zyx, rng=1000 + k), name


def mc_calibration(net, card, noisy: np.ndarray, ref: np.ndarray, fg: np.ndarray, modality: str,
                   samples: int, **kw) -> dict:
    """Monte-Carlo dropout std against the true error on the foreground: RMS std / RMS error (1 =
    calibrated on average) and the correlation of the two maps (an untimed extra pass)."""
    res = denoise_array(noisy, net, card, device="cpu", modality=modality, mc_samples=samples, **kw)
    err = np.abs(res.denoised - ref)[fg]
    unc = res.uncertainty[fg]
    return {"mc_std_ratio_fg": float(np.sqrt(np.mean(unc ** 2)) / max(float(np.sqrt(np.mean(err ** 2))), 1e-12)),
            "mc_std_corr_fg": float(np.corrcoef(unc, err)[0, 1]) if unc.std() > 0 and err.std() > 0 else 0.0,
            "mc_scale": float(res.info["uncertainty_scale"])}


def run_level(models: List[str], names: List[str], images: list, modality: str, level: float,
              lr_factor: int, baseline: str, mc_samples: int = 0, guard: Optional[bool] = None,
              views: Optional[int] = None, tta: Optional[int] = None, baseline_scales: Sequence[float] = (),
              given_sigma: bool = False) -> dict:
    """Score every model (and the baseline) on every image at one noise level.

    With ``given_sigma`` every method is given the simulation's noise level as a user gives it with
    ``--sigma`` (MRI the Rician sigma, CT the std at water with the image's own fit for the shape, US
    the speckle std; ``Degraded.sigma``) instead of estimating it.

    With ``baseline_scales`` the baseline also runs with its noise sigma at each of those multiples
    of the estimate, and the row ``<baseline>_best_sigma`` keeps, per case, the run with the highest
    whole-image PSNR: an oracle (it looks at the clean reference) that gives the baseline its best
    strength, since a classical filter's sigma is also its strength setting."""
    nets = {m: load_model(m, "cpu") for m in models}  # loaded once, used for every case
    rows = []
    for d, name in degraded_cases(images, modality, level, lr_factor):
        noisy = Volume(d.noisy_lr.astype(np.float32), tuple(reversed(d.spacing_lr_zyx)))
        ref = d.clean_lr.astype(np.float32)
        row = {"case": Path(name).name, "shape_zyx": list(ref.shape), "noisy": scores(ref, noisy.array, modality)}
        runs = [(n, "dualnet", {"model": m}) for n, m in zip(names, models)]
        if baseline != "none":
            runs.append((baseline, baseline, {}))
        true_std = noise_std_map(ref, modality, level)
        total_std = input_noise_std_map(true_std, ref, modality)
        fg = foreground_mask(ref, modality)
        sigma = float(d.sigma) if given_sigma else None
        coef = noise_variance_model(noisy.array, modality, sigma)[0] if given_sigma else None  # as api does
        for label, method, kw in runs:
            t = time.perf_counter()
            if method == "dualnet":  # the core's inference directly, to read the NEB maps too
                net, card = nets[kw["model"]]
                res = denoise_array(noisy.array, net, card, device="cpu", modality=modality, guard=guard,
                                    views=views, spacing_zyx=d.spacing_lr_zyx, tta=tta, noise_coef=coef)
                out = res.denoised
            else:
                out = denoise_volume(noisy, method=method, modality=modality, sigma=sigma, **kw).volume.array
            row[label] = scores(ref, out, modality)
            row[label]["seconds"] = time.perf_counter() - t
            if method == "dualnet":
                row[label]["tta"] = int(res.info["tta"])
                row[label]["views"] = int(res.info.get("views", 1))
                row[label]["precision"] = res.info.get("precision", "float32")
            if method == "dualnet" and res.sigma_map is not None:
                row[label].update(neb_maps(res, true_std, total_std, fg))
            if method == "dualnet" and mc_samples > 0:
                row[label].update(mc_calibration(net, card, noisy.array, ref, fg, modality, mc_samples,
                                                 guard=guard, views=views, spacing_zyx=d.spacing_lr_zyx, tta=tta,
                                                 noise_coef=coef))
        if baseline != "none" and baseline_scales:
            row[f"{baseline}_best_sigma"] = best_sigma_run(noisy, ref, baseline, modality, baseline_scales,
                                                           at_estimate=row[baseline])
        rows.append(row)
        print(f"level {level:g} {row['case']}: noisy {row['noisy']['psnr']:.2f} dB | " +
              " | ".join(f"{label} {row[label]['psnr']:.2f} dB ({row[label]['seconds']:.1f} s)"
                         for label, _, _ in runs), flush=True)
    labels = ["noisy"] + [r[0] for r in runs] + ([f"{baseline}_best_sigma"] if baseline != "none" and baseline_scales else [])
    keys = KEYS + (("psnr_win", "ssim_win") if modality == "ct" else ())
    summary = {m: {k: round(float(np.mean([r[m][k] for r in rows])), 4) for k in keys} for m in labels}
    for m in labels[1:]:
        for k in ("neb_sigma_ratio_fg", "neb_sigma_ratio_total_fg", "alpha_mean_fg", "alpha_std_fg",
                  "mc_std_ratio_fg", "mc_std_corr_fg", "mc_scale", "tta"):
            if all(k in r[m] for r in rows):
                summary[m][k] = round(float(np.mean([r[m][k] for r in rows])), 4)
    for m in labels[1:]:
        summary[m]["seconds"] = round(float(np.mean([r[m]["seconds"] for r in rows])), 2)
        if all("precision" in r[m] for r in rows):  # the CPU arithmetic (dualnet.precision)
            summary[m]["precision"] = "/".join(sorted({r[m]["precision"] for r in rows}))
        if all("views" in r[m] for r in rows):  # the transforms each kind of case ran (the default differs)
            summary[m]["tta_by_views"] = {str(v): sorted({r[m]["tta"] for r in rows if r[m]["views"] == v})
                                          for v in sorted({r[m]["views"] for r in rows})}
    return {"level": level, "mean": summary, "per_case": rows}


def best_sigma_run(noisy: Volume, ref: np.ndarray, baseline: str, modality: str, scales: Sequence[float],
                   at_estimate: Optional[dict] = None) -> dict:
    """The baseline's scores at the multiple of the estimated sigma (of ``scales``) with the highest
    whole-image PSNR; ``sigma_scale`` says which, ``seconds`` is that run's time. ``at_estimate``:
    the scores of the baseline already run with its own estimate (the multiple 1), not run again."""
    sigma = float(estimate_noise(noisy.array, modality).sigma)
    best = None
    for k in scales:
        if float(k) == 1.0 and at_estimate is not None:
            sc = {**at_estimate, "sigma_scale": 1.0}
        else:
            t = time.perf_counter()
            out = denoise_volume(noisy, method=baseline, modality=modality, sigma=float(k) * sigma).volume.array
            sc = {**scores(ref, out, modality), "seconds": time.perf_counter() - t, "sigma_scale": float(k)}
        if best is None or sc["psnr"] > best["psnr"]:
            best = sc
    return best


def table(results: List[dict], labels: List[str], baseline: str, modality: str) -> str:
    """Markdown table: one row per (level, method)."""
    win = modality == "ct"
    head = "| level | method | PSNR (dB) | SSIM | PSNR fg | SSIM fg |" + (" PSNR [-160,240] HU | SSIM win |" if win else "") + \
        " seconds | PSNR - " + baseline + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        mean = res["mean"]
        base = mean.get(baseline, {}).get("psnr")
        extra = [m for m in (baseline, f"{baseline}_best_sigma") if m in mean]
        for m in ["noisy"] + labels + extra:
            s = mean[m]
            cells = [f"{res['level']:g}", m, f"{s['psnr']:.2f}", f"{s['ssim']:.3f}", f"{s['psnr_fg']:.2f}", f"{s['ssim_fg']:.3f}"]
            if win:
                cells += [f"{s['psnr_win']:.2f}", f"{s['ssim_win']:.3f}"]
            cells += [f"{s['seconds']:.1f}" if "seconds" in s else "",
                      f"{s['psnr'] - base:+.2f}" if base is not None and m != baseline else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model files (.safetensors with their cards)")
    ap.add_argument("--config", required=True, help="the training config whose val sources are used")
    ap.add_argument("--names", nargs="*", default=None,
                    help="labels of the models in the table (distinct, and not 'noisy' or the --baseline name)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--level", type=float, default=None, help="noise level (default: the issue's target)")
    ap.add_argument("--levels", type=float, nargs="*", default=(), help="more noise levels")
    ap.add_argument("--max-cases", type=int, default=8, help="at most this many validation images (evenly spaced)")
    ap.add_argument("--baseline", default="bm4d", help="bm4d | bm3d | nlm | ... | none")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the cards unchanged")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--mc-samples", type=int, default=0,
                    help="also measure the MC-dropout std against the true error with this many passes")
    ap.add_argument("--no-guard", action="store_true",
                    help="score the network without its SURE guard (default: as `dualnet denoise` runs it)")
    ap.add_argument("--views", default="auto", choices=["auto", "1", "3"],
                    help="network slice orientations (default auto, as `dualnet denoise` runs it)")
    ap.add_argument("--baseline-sigma-scales", type=float, nargs="*", default=(),
                    help="also run the baseline with its sigma at these multiples of the estimate and keep, per "
                         "case, the best (row <baseline>_best_sigma; an oracle), e.g. 0.9 1 1.1 1.2 1.3")
    ap.add_argument("--given-sigma", action="store_true",
                    help="give every method the simulation's noise level as `--sigma` gives it (MRI Rician sigma, "
                         "CT std at water, US speckle std) instead of its estimate; a probe: needs --no-write")
    ap.add_argument("--untouched", action="store_true",
                    help="score the validation images the --max-cases selection leaves out instead (no checkpoint, "
                         "candidate or default was chosen on them: an untouched test set); needs --no-write")
    tta = ap.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", type=int, choices=(1, 4, 8), nargs="?", const=8, default=None,
                     help="test-time transforms of the network averaged: 1 (none), 4 or 8 (bare: 8; "
                          "default: the model's); give it after the model files")
    tta.add_argument("--no-tta", dest="tta", action="store_const", const=1, help="no test-time augmentation")
    args = ap.parse_args()

    cfg = load_config(args.config)
    modality = cfg.modality
    levels = [DEFAULT_LEVELS[modality] if args.level is None else args.level] + list(args.levels)
    names = args.names or ([Path(m).stem for m in args.models] if len(args.models) > 1 else ["dualnet"])
    if len(names) != len(args.models):
        ap.error("--names needs one label per model")
    taken = {"noisy", args.baseline}
    if len(set(names)) != len(names) or taken & set(names):
        ap.error(f"--names must be distinct and none of {sorted(taken)} (the table's other rows)")
    if args.given_sigma and not args.no_write:
        ap.error("--given-sigma is a probe (the cards record the default runs): add --no-write")
    if args.given_sigma and args.baseline_sigma_scales:
        ap.error("--baseline-sigma-scales scales the baseline's estimate: not with --given-sigma")
    if args.untouched and not args.no_write:
        ap.error("--untouched scores other cases than the cards record: add --no-write")
    images = validation_images(cfg, args.data_dir, args.max_cases, args.untouched)
    if not images:
        ap.error(f"no validation images{' beyond the ' + str(args.max_cases) + ' scored ones' if args.untouched else ''}")
    guard = False if args.no_guard else None
    results = [run_level(args.models, names, images, modality, lev, cfg.lr_factor, args.baseline, args.mc_samples,
                         guard, parse_views(args.views), args.tta, args.baseline_sigma_scales, args.given_sigma)
               for lev in levels]
    print(table(results, names, args.baseline, modality))
    meta = {"modality": modality, "lr_factor": cfg.lr_factor, "cases": len(images),
            "case_selection": ("untouched: the validation images outside the evenly spaced "
                               f"{args.max_cases}") if args.untouched else f"at most {args.max_cases}, evenly spaced",
            "data": [s.path for s in cfg.data if s.split == "val"],
            "data_range": "clean low-resolution max - min" + ("; CT window [-160, 240] HU, range 400" if modality == "ct" else ""),
            "mask": "whole image and foreground (fg)",
            "baseline": f"{args.baseline} with the {modality} transform "
                        f"(sigma {'given: the simulation' if args.given_sigma else 'estimated'})",
            "network_noise_model": "given: the simulation's sigma" if args.given_sigma else "estimated",
            **({"best_sigma_baseline": f"{args.baseline} at the best of sigma x {args.baseline_sigma_scales} per case "
                                       "(highest whole-image PSNR; an oracle)"} if args.baseline_sigma_scales else {}),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, CPU, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "mc_samples": args.mc_samples}
    if args.json:
        atomic_write_bytes(args.json, (json.dumps({"meta": meta, "results": results}, indent=1, default=float) + "\n").encode())
    if args.no_write:
        return
    for model, name in zip(args.models, names):
        per_level = []
        for res in results:
            best = f"{args.baseline}_best_sigma"
            mean = {m: res["mean"][m] for m in ("noisy", name, args.baseline, best) if m in res["mean"]}
            mean["dualnet"] = mean.pop(name) if name != "dualnet" else mean["dualnet"]
            gain = mean["dualnet"]["psnr"] - mean[args.baseline]["psnr"] if args.baseline in mean else None
            rows = [{("dualnet" if k == name else k): v for k, v in r.items()
                     if k in ("case", "shape_zyx", "noisy", name, args.baseline, best)} for r in res["per_case"]]
            entry = {"setting": {**meta, "level": res["level"]}, "mean": mean,
                     "psnr_gain_vs_baseline_db": None if gain is None else round(gain, 3), "per_case": rows}
            if best in mean:
                entry["psnr_gain_vs_best_sigma_baseline_db"] = round(mean["dualnet"]["psnr"] - mean[best]["psnr"], 3)
            per_level.append(entry)
        card = read_card(model)
        card.setdefault("metrics", {})["validation"] = per_level[0]
        card["metrics"]["validation_levels"] = [{"level": p["setting"]["level"], "mean": p["mean"],
                                                 **{k: p[k] for k in ("psnr_gain_vs_baseline_db",
                                                                      "psnr_gain_vs_best_sigma_baseline_db") if k in p}}
                                                for p in per_level]
        print(f"wrote metrics.validation into {rewrite_card(model, card)}")


if __name__ == "__main__":
    main()
