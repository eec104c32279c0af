"""Tables, statistics, figures and the Markdown / HTML report of a study (:mod:`dualnet.evaluate`).

Files written to the study folder:

* ``runs.csv`` -- one row per (subset, case, level, seed, method) as computed.
* ``cases.csv`` -- one row per (subset, case, level, method), noise seeds averaged: the unit
  of every statistic (a slab of a volume, or a group of ultrasound frames).
* ``summary.csv`` -- mean and SD over cases per (modality, level, method).
* ``stats.csv`` -- the method under test ("focus") against every other method, per
  (modality, level, metric): paired t or Wilcoxon chosen by Shapiro-Wilk, Holm across the
  baselines of that family (:func:`dualnet.stats.compare_methods`).
* ``figures/box_*.png`` (box plots over cases), ``figures/panel_*.png`` (noisy / methods /
  clean and |method - clean| maps of the central slice of the first case).
* ``report.md`` and ``report.html`` (a plain conversion of the Markdown).
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import math
import os
import platform
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

METRIC_LABELS = OrderedDict(
    [
        ("psnr_fg", "PSNR fg (dB)"),
        ("psnr_all", "PSNR all (dB)"),
        ("ssim_fg", "SSIM fg"),
        ("ssim_all", "SSIM all"),
        ("rmse_fg", "RMSE fg"),
        ("rmse_all", "RMSE all"),
        ("dice", "Dice"),
        ("seconds", "runtime (s)"),
    ]
)
LOWER_IS_BETTER = {"rmse_fg", "rmse_all", "seconds"}

#: Fewest cases with a value for both methods before a paired test is reported.
MIN_CASES = 3

PRETTY = {"dualnet": "DUAL-NET", "dualnet_ft": "DUAL-NET (fine-tuned)", "nlm": "NLM", "bm3d": "BM3D", "bm4d": "BM4D",
          "dncnn": "DnCNN", "n2v": "Noise2Void", "gaussian": "Gaussian", "median": "median", "noisy": "noisy input",
          "diffusion": "anisotropic diffusion"}

ATTRIBUTION = {
    "mri/adni_mprage": "ADNI-protocol 3T T1 MPRAGE, neurolabusc/dcm_qa_philips_enh (BSD-2-Clause); FAST maps from neurolabusc/nii2mesh",
    "mri/voxelmorph": "voxelmorph/voxelmorph test scan and labels (Apache-2.0)",
    "ct/totalseg": "wasserth/TotalSegmentator example CT and automatic masks (Apache-2.0)",
    "ct/chest": "InsightSoftwareConsortium/ITKElastix example chest CT (Apache-2.0)",
    "us/": "tmkand/usgra-seg ultrasound frames and manual masks (CC-BY-4.0, T. M. Kand)",
}


def pretty(method: str) -> str:
    return PRETTY.get(method, method)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "--"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "--"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _fmt_p(p: Any) -> str:
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "--"
    if math.isnan(v):
        return "--"
    return "<0.0001" if v < 1e-4 else f"{v:.4f}"


# ----------------------------------------------------------------------------- tables
def metric_columns(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Metric names present in the records, in a stable order (known ones first)."""
    keys: List[str] = []
    skip = {"subset", "modality", "case", "level", "seed", "method", "n_items", "n_seeds"}
    for r in records:
        for k in r:
            if k not in skip and k not in keys:
                keys.append(k)
    known = [k for k in METRIC_LABELS if k in keys]
    return known + sorted(k for k in keys if k not in known)


def case_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Average the noise seeds of each (subset, case, level, method): one row per case."""
    groups: "OrderedDict[Tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in records:
        groups.setdefault((r["subset"], r["modality"], r["case"], r["level"], r["method"]), []).append(r)
    cols = metric_columns(records)
    rows = []
    for (subset, modality, case, level, method), rs in groups.items():
        row: Dict[str, Any] = {"subset": subset, "modality": modality, "case": case, "level": level,
                               "method": method, "n_seeds": len(rs)}
        for c in cols:
            vals = [float(r[c]) for r in rs if c in r]
            row[c] = float(np.mean(vals)) if vals else float("nan")
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def families(rows: Sequence[Dict[str, Any]]) -> "OrderedDict[Tuple[str, float], List[Dict[str, Any]]]":
    """Case rows grouped by (modality, level)."""
    out: "OrderedDict[Tuple[str, float], List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        out.setdefault((r["modality"], float(r["level"])), []).append(r)
    return out


def method_table(rows: Sequence[Dict[str, Any]], metric: str, methods: Sequence[str]) -> Tuple[List[Tuple[str, str]], Dict[str, np.ndarray]]:
    """Values of ``metric`` aligned by case: ``(case keys, {method: array})`` with NaN when missing."""
    cases = sorted({(r["subset"], r["case"]) for r in rows})
    index = {c: i for i, c in enumerate(cases)}
    table = {}
    for m in methods:
        arr = np.full(len(cases), np.nan)
        for r in rows:
            if r["method"] == m and metric in r:
                arr[index[(r["subset"], r["case"])]] = float(r[metric])
        if np.isfinite(arr).any():
            table[m] = arr
    return cases, table


def summary_rows(rows: Sequence[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """Mean and SD (n - 1) over cases per (modality, level, method)."""
    out = []
    cols = metric_columns(rows)
    for (modality, level), fam in families(rows).items():
        for m in methods:
            rs = [r for r in fam if r["method"] == m]
            if not rs:
                continue
            row: Dict[str, Any] = {"modality": modality, "level": level, "method": m, "n_cases": len(rs)}
            for c in cols:
                v = np.array([float(r.get(c, np.nan)) for r in rs])
                v = v[np.isfinite(v)]
                row[f"{c}_mean"] = float(v.mean()) if v.size else float("nan")
                row[f"{c}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
            out.append(row)
    return out


def choose_focus(focus: Sequence[str], methods_with_data: Sequence[str]) -> Optional[str]:
    """The method under test: the first of ``focus`` that has results."""
    for f in focus:
        if f in methods_with_data:
            return f
    return None


def stats_rows(
    rows: Sequence[Dict[str, Any]], methods: Sequence[str], focus: Sequence[str], metrics: Sequence[str], alpha: float
) -> Tuple[List[Dict[str, Any]], Dict[Tuple[str, float], Optional[str]]]:
    """Paired comparisons of the focus method against every other method, per (modality, level, metric).

    Holm's correction is applied across the baselines within each (modality, level, metric)
    family. ``mean_diff`` = focus - baseline (metric units). Unit: the case.
    """
    from .stats import compare_methods

    out: List[Dict[str, Any]] = []
    focus_used: Dict[Tuple[str, float], Optional[str]] = {}
    for (modality, level), fam in families(rows).items():
        present = [m for m in methods if any(r["method"] == m for r in fam)]
        f = choose_focus(focus, present)
        focus_used[(modality, level)] = f
        if f is None:
            continue
        for metric in metrics:
            cases, table = method_table(fam, metric, present)
            if f not in table or len(table) < 2:
                continue
            ok = {m: v for m, v in table.items()
                  if (np.isfinite(v) & np.isfinite(table[f])).sum() >= MIN_CASES}
            if f not in ok or len(ok) < 2:
                continue
            for res in compare_methods(ok, f, alpha=alpha, reference_first=True):
                d = res.to_dict()
                d.update({"modality": modality, "level": level, "metric": metric, "focus": f, "baseline": res.method})
                better = (res.mean_diff < 0) if metric in LOWER_IS_BETTER else (res.mean_diff > 0)
                d["focus_better"] = bool(better and res.p_holm < alpha)
                d["focus_worse"] = bool((not better) and res.mean_diff != 0 and res.p_holm < alpha)
                out.append(d)
    return out, focus_used


STATS_COLUMNS = ["modality", "level", "metric", "focus", "baseline", "test", "statistic", "p", "p_holm", "mean_diff",
                 "ci_low", "ci_high", "ci_method", "d_z", "n", "normality_p", "focus_better", "focus_worse"]


def not_beating_sentences(stats: Sequence[Dict[str, Any]], alpha: float) -> List[str]:
    """Plain sentences, one per (modality, level), saying where the focus method does not
    significantly beat a baseline (significantly worse, or no significant improvement)."""
    fams: "OrderedDict[Tuple[str, float, str], List[Dict[str, Any]]]" = OrderedDict()
    for s in stats:
        if not s["focus_better"]:
            fams.setdefault((s["modality"], float(s["level"]), s["focus"]), []).append(s)

    def describe(s: Dict[str, Any]) -> str:
        return (f"{pretty(s['baseline'])} on {METRIC_LABELS.get(s['metric'], s['metric'])} "
                f"(difference {_fmt(s['mean_diff'])}, Holm p {_fmt_p(s['p_holm'])}, n = {s['n']})")

    sentences = []
    for (modality, level, f), items in fams.items():
        worse = [s for s in items if s["focus_worse"]]
        tie = [s for s in items if not s["focus_worse"]]
        parts = []
        if worse:
            parts.append("is significantly worse than " + "; ".join(describe(s) for s in worse))
        if tie:
            parts.append(f"is not significantly better (Holm p >= {alpha:g} or the difference points the other way) than "
                         + "; ".join(describe(s) for s in tie))
        sentences.append(f"- {modality.upper()}, level {level:g}: {pretty(f)} " + ", and ".join(parts) + ".")
    return sentences


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def box_plots(rows: Sequence[Dict[str, Any]], methods: Sequence[str], metrics: Sequence[str], folder: Path) -> List[Path]:
    """One PNG per (modality, level): a box plot over cases per metric and method."""
    plt = _plt()
    paths = []
    for (modality, level), fam in families(rows).items():
        present = [m for m in methods if any(r["method"] == m for r in fam)]
        mets = [m for m in metrics if any(np.isfinite(float(r.get(m, np.nan))) for r in fam)]
        if not present or not mets:
            continue
        fig, axes = plt.subplots(1, len(mets), figsize=(max(4.0, 1.1 * len(present)) * len(mets) / 1.5, 3.6), squeeze=False)
        for ax, metric in zip(axes[0], mets):
            data = []
            for m in present:
                v = np.array([float(r.get(metric, np.nan)) for r in fam if r["method"] == m])
                data.append(v[np.isfinite(v)])
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(present) + 1), [pretty(m) for m in present], rotation=45, ha="right", fontsize=8)
            ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{modality.upper()} level {level:g} (one point per case)", fontsize=10)
        fig.tight_layout()
        path = folder / f"box_{modality}_L{level:g}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def image_panels(panels: Dict[str, Dict[str, str]], methods: Sequence[str], folder: Path) -> List[Path]:
    """Per subset: noisy / each method / clean (top) and |image - clean| (bottom), central slice."""
    plt = _plt()
    paths = []
    for subset, files in panels.items():
        present = [m for m in methods if m in files and m != "noisy"]
        first = files.get("noisy") or (files[present[0]] if present else None)
        if first is None:
            continue
        with np.load(first) as z:
            noisy, clean = z["noisy"], z["clean"]
        images = [("noisy input", noisy)]
        for m in present:
            with np.load(files[m]) as z:
                images.append((pretty(m), z["out"]))
        images.append(("clean LR reference", clean))
        lo, hi = np.percentile(clean, [0.5, 99.5])
        if hi <= lo:
            hi = lo + 1.0
        dmax = max(float(np.percentile(np.abs(img - clean), 99.5)) for _, img in images[:-1]) or 1.0
        n = len(images)
        fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
        for j, (title, img) in enumerate(images):
            axes[0, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            axes[0, j].set_title(title, fontsize=8)
            if j < n - 1:
                axes[1, j].imshow(np.abs(img - clean), cmap="magma", vmin=0, vmax=dmax, interpolation="nearest")
                axes[1, j].set_title(f"|{title} - clean|", fontsize=7)
            for a in (axes[0, j], axes[1, j]):
                a.axis("off")
        fig.suptitle(f"{subset}: central slice of the first case (difference maps share one scale, 0..{dmax:.3g})", fontsize=9)
        fig.tight_layout()
        path = folder / f"panel_{subset}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- environment
def versions() -> Dict[str, str]:
    """Versions of Python and the packages that shape the numbers (``not installed`` if absent)."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "scipy", "scikit-image", "SimpleITK", "torch", "bm4d", "bm3d", "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        from . import __version__

        out["dualnet"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return out


def machine() -> Dict[str, str]:
    """Platform, CPU count and (if torch is already imported) the CUDA device."""
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "cpu_count": str(os.cpu_count())}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
        except Exception:  # pragma: no cover
            info["cuda"] = "unknown"
    return info


# ----------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in body]
    return lines


def write_report(result) -> Path:
    """Write CSV tables, figures, ``report.md`` and ``report.html``; return the Markdown path.

    Args:
        result: a :class:`dualnet.evaluate.StudyResult`.
    """
    from .io import atomic_write_bytes

    out = Path(result.out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    study = cfg["study"]
    alpha = float(study["alpha"])
    methods = list(result.methods)
    records = result.records

    # CSV -------------------------------------------------------------------
    mcols = metric_columns(records)
    _write_csv(out / "runs.csv", records, ["subset", "modality", "case", "level", "seed", "method", "n_items"] + mcols)
    rows = case_rows(records)
    _write_csv(out / "cases.csv", rows, ["subset", "modality", "case", "level", "method", "n_seeds"] + mcols)
    summ = summary_rows(rows, methods)
    _write_csv(out / "summary.csv", summ, ["modality", "level", "method", "n_cases"]
               + [f"{c}_{s}" for c in mcols for s in ("mean", "sd")])
    stat_metrics = [m for m in study["stats_metrics"] if m in mcols]
    stats, focus_used = stats_rows(rows, methods, study["focus"], stat_metrics, alpha)
    _write_csv(out / "stats.csv", stats, STATS_COLUMNS)

    # figures ---------------------------------------------------------------
    box = box_plots(rows, methods, [m for m in ("psnr_fg", "ssim_fg", "dice", "seconds") if m in mcols], figdir)
    pan = image_panels(result.panels, methods, figdir)

    # markdown --------------------------------------------------------------
    L: List[str] = []
    name = study.get("name", Path(result.config_path).stem)
    L += [f"# {name}", ""]
    if study.get("description"):
        L += [str(study["description"]).strip(), ""]
    L += ["## How this was run", "",
          f"- Command: `{result.command}`",
          f"- Config: `{result.config_path}`; data folder: `{result.data_dir}`",
          f"- Noise seeds: {', '.join(str(s) for s in study['seeds'])} (per case the seed is derived from "
          "subset, case, level and this seed; several seeds of one case are averaged before statistics)",
          f"- Cases computed now: {result.computed}; reused from `cache/`: {result.cache_hits}; wall time {result.seconds:.1f} s",
          "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
          "- Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
          "- Runtimes are wall-clock seconds of the method alone on this machine (cached cases keep the runtime "
          "of the run that computed them).", ""]

    L += ["## Protocol", "",
          "- Each clean scan is degraded with `dualnet.degrade.degrade` (blur, downsampling by `lr_factor`, "
          "modality noise at the stated level) and every method denoises the noisy LOW-RESOLUTION image. "
          "All metrics compare `clean_lr` with the method's output on the same low-resolution grid "
          "(`noisy` is the noisy input itself); no method is asked to upsample.",
          "- PSNR = 10 log10(R^2 / MSE) with the data range R stated per subset below; SSIM after Wang et al. "
          "(Gaussian window sigma 1.5 voxels, 3D for volumes, 2D for ultrasound frames; K1 0.01, K2 0.03) averaged "
          "over the mask away from the border; RMSE in image units. `fg` = foreground mask of the clean reference "
          "(MRI Otsu, CT body HU > -500, US image sector), `all` = whole image. RMSE is in image units, which "
          "differ between MRI scans: compare RMSE within a subset (`cases.csv`), not pooled over a modality.",
          "- Dice: a frozen classical segmenter (`dualnet.segment`), fitted once per subset on the clean LR "
          "references with the reference labels, is applied unchanged to the clean reference and to every "
          "method's output; Dice is between those two predictions (mean over the target labels present in the "
          "case's reference labels; a structure absent from them is not scored; two empty predictions count as 1). "
          "It measures how far denoising moves a downstream segmentation, not segmentation accuracy.",
          "- Statistical unit: the case (a slab of a volume, or a group of ultrasound frames); slices and voxels "
          "are never counted as samples. Slabs of one scan are not independent patients: the p values describe "
          "these cases, not a population.",
          f"- Tests: for each modality, level and metric the method under test is compared with every other method: "
          f"Shapiro-Wilk on the paired differences (alpha {alpha:g}) picks a paired t-test (t-based 95% CI) or "
          "a Wilcoxon signed-rank test (BCa bootstrap 95% CI of the mean difference, fixed seed); Holm's correction "
          "across the baselines of each family; d_z = mean difference / SD of differences. A comparison needs at "
          f"least {MIN_CASES} cases with a value for both methods (e.g. Dice only counts cases whose labels contain "
          "the structure).",
          "- Runtimes include each method's first-call overhead (imports) in the first case it runs.", ""]

    L += ["## Data and cases", ""]
    body = []
    for s in cfg["subset"]:
        src = s.get("image") or s.get("images")
        att = next((v for k, v in ATTRIBUTION.items() if str(src).startswith(k)), "see shared/data/README.md")
        dr = s.get("data_range", {"mri": "reference", "ct": 2000.0, "us": 255.0}[s["modality"]])
        drs = "max - min of the clean LR case" if dr == "reference" else f"{dr:g} (fixed)"
        levels = ", ".join(f"{v:g}" for v in s["levels"])
        body.append([s["name"], s["modality"].upper(), f"`{src}`", str(len(result.cases.get(s["name"], []))), levels,
                     f"{float(s.get('lr_factor', 2)):g}", drs, (s.get("labels") or {}).get("kind", "none"), att])
    L += _md_table(["subset", "modality", "source", "cases", "levels", "LR factor", "data range", "labels", "source / licence"], body)
    L += ["", "Levels: MRI = Rician sigma as a fraction of the clean maximum, CT = dose fraction, US = looks of the "
          "Gamma speckle.", ""]
    L += ["<details><summary>case list</summary>", ""]
    for sname, cs in result.cases.items():
        L += [f"- {sname}: " + "; ".join(f"{c['case']} = {c['source']}" for c in cs)]
    L += ["", "</details>", ""]

    L += ["## Methods", ""]
    mbody = []
    for m in methods:
        mbody.append([pretty(m), f"`{m}`", result.descriptions.get(m, ""), _status_text(result.status, m)])
    L += _md_table(["method", "name", "what", "status"], mbody)
    L += [""]

    L += ["## Results (mean ± SD over cases)", ""]
    show = [c for c in ("psnr_fg", "psnr_all", "ssim_fg", "ssim_all", "rmse_fg", "dice", "seconds") if c in mcols]
    for (modality, level), _ in families(rows).items():
        L += [f"### {modality.upper()}, level {level:g}", ""]
        body = []
        for r in summ:
            if r["modality"] == modality and float(r["level"]) == level:
                body.append([pretty(r["method"]), str(r["n_cases"])] +
                            [f"{_fmt(r[f'{c}_mean'])} ± {_fmt(r[f'{c}_sd'])}" for c in show])
        L += _md_table(["method", "n"] + [METRIC_LABELS.get(c, c) for c in show], body)
        L += [""]
    extra = [c for c in mcols if c.startswith("dice_")]
    if extra:
        L += ["Per-label Dice columns (" + ", ".join(f"`{c}`" for c in extra) + ") are in `cases.csv` and `summary.csv`.", ""]

    L += ["## Paired statistics (unit: case)", ""]
    if not stats:
        L += [f"No paired statistics: fewer than two methods with at least {MIN_CASES} cases, or no method under test "
              f"(focus list: {', '.join(study['focus'])}) produced results.", ""]
    for (modality, level), f in focus_used.items():
        fam = [s for s in stats if s["modality"] == modality and float(s["level"]) == level]
        if f is None:
            L += [f"{modality.upper()} level {level:g}: none of the methods under test ({', '.join(study['focus'])}) "
                  "produced results; no statistics.", ""]
            continue
        if not fam:
            continue
        wanted = study["focus"][0]
        note = "" if f == wanted else f" ({pretty(wanted)} has no results here; the next method in the focus list is tested)"
        L += [f"### {modality.upper()}, level {level:g}: {pretty(f)} minus each baseline{note}", ""]
        body = []
        for s in fam:
            body.append([METRIC_LABELS.get(s["metric"], s["metric"]), pretty(s["baseline"]), s["test"], _fmt(s["statistic"]),
                         _fmt_p(s["p"]), _fmt_p(s["p_holm"]), f"{_fmt(s['mean_diff'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]",
                         _fmt(s["d_z"], 2), str(s["n"]), _fmt_p(s["normality_p"])])
        L += _md_table(["metric", "baseline", "test", "statistic", "p", "p (Holm)", "mean diff [95% CI]", "d_z", "n",
                        "Shapiro p"], body)
        L += [""]

    L += ["## Where the method under test does not beat a baseline", ""]
    sentences = not_beating_sentences(stats, alpha)
    if stats and not sentences:
        tested = sorted({pretty(s["focus"]) for s in stats})
        L += [f"{' and '.join(tested)} significantly beats every baseline on every tested metric (Holm-adjusted p < {alpha:g}).", ""]
    elif not stats:
        L += ["Not assessed (no paired statistics).", ""]
    else:
        L += sentences + [""]
    if study["focus"] and study["focus"][0] not in {s["focus"] for s in stats}:
        L += [f"{pretty(study['focus'][0])} was not assessed ({_status_text(result.status, study['focus'][0])}).", ""]

    L += ["## Figures", ""]
    for p in box:
        L += [f"![{p.stem}](figures/{p.name})", ""]
    for p in pan:
        L += [f"![{p.stem}](figures/{p.name})", ""]

    if result.segmenters:
        L += ["## Frozen segmenters", "", "Parameters fitted on the clean LR references (intensities in image units):", ""]
        for sname, segd in result.segmenters.items():
            params = ", ".join(f"{k} = {_fmt_list(v)}" for k, v in segd["params"].items())
            L += [f"- {sname}: `{segd['kind']}`, targets {', '.join(segd['names'][t] for t in segd['targets'])}; {params}"]
        L += [""]

    L += ["## Files", "", "`cases.csv` (one row per case and method, seeds averaged), `runs.csv` (per seed), "
          "`summary.csv`, `stats.csv`, `figures/`, `cache/` (per-case JSON, reused on the next run).", ""]

    md = "\n".join(L)
    md_path = out / "report.md"
    atomic_write_bytes(md_path, md.encode("utf-8"))
    atomic_write_bytes(out / "report.html", markdown_to_html(md, title=str(name)).encode("utf-8"))
    return md_path


def _status_text(status: Dict[str, Dict[str, str]], method: str) -> str:
    """``ok``, or each distinct status with the subsets it applies to."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for subset, st in status.items():
        groups.setdefault(st.get(method, "not configured"), []).append(subset)
    if list(groups) == ["ok"]:
        return "ok"
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(subs)}: {text}" for text, subs in groups.items())


def _fmt_list(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return _fmt(v) if isinstance(v, (int, float)) else str(v)


# ----------------------------------------------------------------------------- HTML
def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        t = html.escape(part, quote=False)
        t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
        out.append(t)
    return "".join(out)


def markdown_to_html(md: str, title: str = "report") -> str:
    """A plain conversion of the report's Markdown subset (headings, lists, tables, images,
    inline code, ``<details>``) to a standalone HTML page."""
    lines = md.splitlines()
    body: List[str] = []
    i = 0
    in_list = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|(-{3,}\|)+$", lines[i + 1].replace(" ", "")):
            if in_list:
                body.append("</ul>")
                in_list = False
            cells = [c.strip() for c in line.strip("|").split("|")]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells) + "</tr></thead><tbody>")
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
                i += 1
            body.append("</tbody></table>")
            continue
        if line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(line[2:])}</li>")
        else:
            if in_list:
                body.append("</ul>")
                in_list = False
            m = re.match(r"^(#{1,6}) (.*)$", line)
            if m:
                n = len(m.group(1))
                body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            elif line.startswith("<details>") or line.startswith("</details>"):
                body.append(line)
            elif line.strip():
                body.append(f"<p>{_inline(line)}</p>")
        i += 1
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #bbb;padding:3px 6px}"
             "th{background:#eee}img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
