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
* ``ablations.csv`` -- full model against each ablated variant (``[ablations]`` of the config).
* ``robustness.csv`` -- one row per (subset, case, condition) of ``[robustness]``.
* ``calibration.csv`` and ``figures/calibration.png`` -- MC-dropout std against the actual error.
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

from .stats import MIN_CASES_TEST_CHOICE

METRIC_LABELS = OrderedDict(
    [
        ("psnr_fg", "PSNR fg (dB)"),
        ("psnr_all", "PSNR all (dB)"),
        ("ssim_fg", "SSIM fg"),
        ("ssim_all", "SSIM all"),
        ("rmse_fg", "RMSE fg"),
        ("rmse_all", "RMSE all"),
        ("dice", "Dice"),
        ("dice_agree", "Dice vs clean seg."),
        ("seconds", "runtime (s)"),
        ("seconds_finetune", "of which fine-tuning (s)"),
    ]
)
LOWER_IS_BETTER = {"rmse_fg", "rmse_all", "seconds", "seconds_finetune"}

#: Fewest cases with a value for both methods before a paired test is reported.
MIN_CASES = 3

PRETTY = {"dualnet": "DUAL-NET", "dualnet_ft": "DUAL-NET (fine-tuned)", "dualnet_ref": "DUAL-NET (ablation reference)",
          "dualnet_noneb": "DUAL-NET without NEB", "dualnet_nonl": "DUAL-NET without non-local attention", "nlm": "NLM", "bm3d": "BM3D", "bm4d": "BM4D",
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


def _pm(mean: Any, sd: Any) -> str:
    """``mean ± sd``, or ``--`` when the mean is missing."""
    return "--" if _fmt(mean) == "--" else f"{_fmt(mean)} ± {_fmt(sd)}"


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
    """Write rows through the output guard (atomic, never over an input)."""
    import io as _stdio

    from .io import atomic_write_bytes

    buf = _stdio.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _save_figure(fig: Any, path: Path, dpi: int) -> None:
    from .io import save_figure

    save_figure(fig, path, dpi=dpi)


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
                row[f"{c}_n"] = int(v.size)  # Dice: only the cases whose labels hold the structure
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
            ok = _family(ok, f, focus)
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


def _family(table: Dict[str, np.ndarray], f: str, focus: Sequence[str]) -> Dict[str, np.ndarray]:
    """The methods ``f`` is compared with (and ``f``): not its own variants (``f_...``, e.g. its per-case
    fine-tuning, whose results equal f's where the base is kept: they only inflated Holm's m), and a
    method only once where another gives the very same values (BM4D runs BM3D on 2D ultrasound)."""
    kept: Dict[str, np.ndarray] = {}
    for m, v in table.items():
        if m != f and m.startswith(f + "_"):
            continue
        if m != f and any(k != f and np.array_equal(v, w, equal_nan=True) for k, w in kept.items()):
            continue
        kept[m] = v
    return kept


def untested_families(rows: Sequence[Dict[str, Any]], focus_used: Dict[Tuple[str, float], Optional[str]],
                      metrics: Sequence[str], stats: Sequence[Dict[str, Any]]) -> List[str]:
    """One sentence per (modality, level, metric) with results but no test: fewer than MIN_CASES cases
    with a value for the method under test (e.g. Dice where the labels hold the structure)."""
    tested = {(s["modality"], float(s["level"]), s["metric"]) for s in stats}
    lines = []
    for (modality, level), fam in families(rows).items():
        f = focus_used.get((modality, level))
        for metric in metrics:
            n = sum(1 for r in fam if r["method"] == f and np.isfinite(float(r.get(metric, np.nan))))
            if f is not None and 0 < n < MIN_CASES and (modality, float(level), metric) not in tested:
                lines.append(f"- {modality.upper()} level {level:g}, {metric}: {n} case(s) with a value, fewer than "
                             f"{MIN_CASES}: not tested (see the results table).")
    return lines


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
        _save_figure(fig, path, dpi=100)
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
        _save_figure(fig, path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- Dice ceiling
def ablation_only(cfg: Dict[str, Any]) -> List[str]:
    """Methods declared with ``ablation = true``: reported in the Ablations section and kept out
    of the main paired-statistics families (so they do not change the Holm corrections there)."""
    return [m for m, opts in (cfg.get("methods") or {}).items() if isinstance(opts, dict) and opts.get("ablation")]


def ceiling_by_modality(cfg: Dict[str, Any], ceilings: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Dice of the frozen segmenter on the clean LR references against the reference labels,
    pooled over the cases of every subset of a modality: ``{modality: {mean, sd, n, per_label}}``."""
    out: Dict[str, Dict[str, Any]] = {}
    for sub in cfg["subset"]:
        rows = ceilings.get(sub["name"]) or []
        d = out.setdefault(sub["modality"], {"values": [], "labels": OrderedDict()})
        for r in rows:
            d["values"].append(float(r.get("dice", np.nan)))
            for k, v in r.items():
                if k.startswith("dice_"):
                    d["labels"].setdefault(k, []).append(float(v))
    res = {}
    for mod, d in out.items():
        v = np.array(d["values"])
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        per_label = {k: float(np.nanmean(vals)) for k, vals in d["labels"].items() if np.isfinite(vals).any()}
        res[mod] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                    "n": int(v.size), "per_label": per_label}
    return res


# ----------------------------------------------------------------------------- ablations
ABLATION_COLUMNS = ["subset", "level", "metric", "full", "ablated", "without", "n", "full_mean", "full_sd",
                    "ablated_mean", "ablated_sd", "test", "statistic", "p", "p_holm", "mean_diff", "ci_low",
                    "ci_high", "d_z"]


def ablation_rows(rows: Sequence[Dict[str, Any]], ablations: Dict[str, Any], alpha: float) -> List[Dict[str, Any]]:
    """Full model against each ablated variant per (subset, level, metric), unit: the case.

    ``ablations`` is the config's ``[ablations]`` table: ``pairs`` (``full``, ``ablated``,
    ``without``), ``metrics`` (default psnr_fg, ssim_fg) and ``subsets`` (default all).
    ``mean_diff`` = full - ablated (dB for PSNR); the test is chosen as in :mod:`dualnet.stats`;
    Holm across the pairs tested within one (subset, level, metric). Pairs with fewer than
    :data:`MIN_CASES` common cases get means but no test.
    """
    from .stats import holm_bonferroni, paired_test

    pairs = ablations.get("pairs") or []
    metrics = ablations.get("metrics") or ["psnr_fg", "ssim_fg"]
    wanted = ablations.get("subsets")
    out: List[Dict[str, Any]] = []
    groups: "OrderedDict[Tuple[str, float], List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        if wanted is None or r["subset"] in wanted:
            groups.setdefault((r["subset"], float(r["level"])), []).append(r)
    for (subset, level), fam in groups.items():
        for metric in metrics:
            family = []
            for pair in pairs:
                full, abl = pair["full"], pair["ablated"]
                _, table = method_table(fam, metric, [full, abl])
                if full not in table or abl not in table:
                    continue
                a, b = table[full], table[abl]
                keep = np.isfinite(a) & np.isfinite(b)
                d: Dict[str, Any] = {"subset": subset, "level": level, "metric": metric, "full": full, "ablated": abl,
                                     "without": pair.get("without", ""), "n": int(keep.sum()),
                                     "full_mean": float(np.mean(a[keep])) if keep.any() else float("nan"),
                                     "full_sd": float(np.std(a[keep], ddof=1)) if keep.sum() > 1 else float("nan"),
                                     "ablated_mean": float(np.mean(b[keep])) if keep.any() else float("nan"),
                                     "ablated_sd": float(np.std(b[keep], ddof=1)) if keep.sum() > 1 else float("nan"),
                                     "test": "not tested", "p": float("nan"), "p_holm": float("nan"),
                                     "mean_diff": float(np.mean(a[keep] - b[keep])) if keep.any() else float("nan"),
                                     "ci_low": float("nan"), "ci_high": float("nan"), "d_z": float("nan"),
                                     "statistic": float("nan")}
                if keep.sum() >= MIN_CASES:
                    res = paired_test(a[keep], b[keep], alpha=alpha)
                    d.update(test=res.test, statistic=res.statistic, p=res.p, mean_diff=res.mean_diff,
                             ci_low=res.ci_low, ci_high=res.ci_high, d_z=res.d_z)
                    family.append(d)
                out.append(d)
            if family:
                for d, ph in zip(family, holm_bonferroni([d["p"] for d in family])):
                    d["p_holm"] = ph
    return out


def ablation_lines(result, rows: Sequence[Dict[str, Any]], alpha: float) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Markdown of the Ablations section and its rows (for ``ablations.csv``)."""
    abl = result.config.get("ablations")
    if not abl:
        return [], []
    L = ["## Ablations", "",
         "Each ablated variant is compared with the full model it derives from, on the same cases (unit: the case): "
         "mean ± SD over cases, mean difference = full minus ablated with its 95% CI, the paired test chosen as in the "
         "main statistics and Holm's correction across the ablations of each subset, level and metric. Positive "
         "differences in PSNR / SSIM mean the removed component helps. The NEB / non-local variants are compared with "
         "a full model trained with the same budget (not with the shipped model).", ""]
    arows = ablation_rows(rows, abl, alpha)
    if arows:
        body = []
        for d in arows:
            body.append([d["subset"], f"{float(d['level']):g}", METRIC_LABELS.get(d["metric"], d["metric"]),
                         d["without"] or pretty(d["ablated"]), pretty(d["full"]), pretty(d["ablated"]),
                         f"{_fmt(d['full_mean'])} ± {_fmt(d['full_sd'])}", f"{_fmt(d['ablated_mean'])} ± {_fmt(d['ablated_sd'])}",
                         f"{_fmt(d['mean_diff'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]", d["test"],
                         _fmt_p(d["p_holm"]), str(d["n"])])
        L += _md_table(["subset", "level", "metric", "without", "full", "ablated", "full (mean ± SD)",
                        "ablated (mean ± SD)", "full - ablated [95% CI]", "test", "p (Holm)", "n"], body)
        L += [""]
        for d in arows:
            if d["test"] == "not tested":
                L += [f"- {d['subset']} level {float(d['level']):g}, {METRIC_LABELS.get(d['metric'], d['metric'])}, "
                      f"without {d['without'] or d['ablated']}: not tested (only {d['n']} cases with both; at least {MIN_CASES} needed)."]
                continue
            helps = d["mean_diff"] > 0 if d["metric"] not in LOWER_IS_BETTER else d["mean_diff"] < 0
            hurts = d["mean_diff"] < 0 if d["metric"] not in LOWER_IS_BETTER else d["mean_diff"] > 0
            if hurts and d["p_holm"] < alpha:
                L += [f"- {d['subset']} level {float(d['level']):g}, {METRIC_LABELS.get(d['metric'], d['metric'])}: the model "
                      f"is significantly BETTER without {d['without'] or d['ablated']} (difference "
                      f"{_fmt(d['mean_diff'])}, Holm p {_fmt_p(d['p_holm'])}, n = {d['n']})."]
            elif not (helps and d["p_holm"] < alpha):
                L += [f"- {d['subset']} level {float(d['level']):g}, {METRIC_LABELS.get(d['metric'], d['metric'])}: removing "
                      f"{d['without'] or d['ablated']} does NOT make the model significantly worse (difference "
                      f"{_fmt(d['mean_diff'])}, Holm p {_fmt_p(d['p_holm'])}, n = {d['n']})."]
        L += [""]
    missing = []
    for pair in abl.get("pairs") or []:
        for m in (pair["full"], pair["ablated"]):
            st = _status_text(result.status, m)
            if st != "ok" and m not in missing:
                missing.append(m)
                L += [f"- {pretty(m)} (`{m}`): {st}"]
    if missing:
        L += ["", "Ablations with a method listed above as unavailable are not reported.", ""]
    if not arows and not missing:
        L += ["No ablation results.", ""]
    return L, arows


# ----------------------------------------------------------------------------- robustness
ROBUST_COLUMNS = ["subset", "modality", "case", "cid", "label", "kind", "noise", "level", "in_range", "reference",
                  "psnr_noisy", "psnr_dualnet", "psnr_reference", "ssim_noisy", "ssim_dualnet", "ssim_reference",
                  "alpha_fg", "sigma_fg", "true_std_fg", "total_std_fg", "seconds_dualnet", "seconds_reference"]

#: The NEB sigma counts as "off" when it differs from the true std by more than this fraction.
SIGMA_TOLERANCE = 0.25
#: NEB confidence "drops" under a condition when its foreground mean is this much (absolute)
#: below the study-level condition's.
ALPHA_DROP = 0.05


def _mean_of(rows: Sequence[Dict[str, Any]], key: str) -> float:
    v = np.array([float(r.get(key, np.nan)) if r.get(key) is not None else np.nan for r in rows])
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def robustness_lines(result) -> List[str]:
    """Markdown of the Robustness section (numbers from ``result.robustness``)."""
    rob = result.robustness
    if not rob:
        return []
    L = ["## Robustness: noise levels outside the training range and mis-specified noise", "",
         "For the first cases of each subset (numbers are means over those cases), the shipped DUAL-NET model of the "
         "modality denoises (a) the modality's own noise at the study level (inside the model's training range, the "
         "comparison point) and at levels outside the training range, and (b) mis-specified noise: a noise model "
         "of another modality (`dualnet.noise`) with the same mean foreground standard deviation as the modality's "
         "noise at the study level. The classical reference method is run on the same inputs. NEB alpha = the noise "
         "branch's confidence map, NEB sigma = its noise-std estimate (image units), both averaged over the "
         "foreground in the same tiling pass that produces the output; true std = the std of the noise actually "
         "added (`dualnet.noise.noise_std_map` or the mis-specified model's), averaged over the same voxels; "
         "with the scan's own = that noise together with the noise the real reference scan already carries, "
         "estimated on the reference (`dualnet.estimate.own_noise_std_map`). "
         "PSNR over the foreground, data range as in the main study.", ""]
    for sname, info in rob["subsets"].items():
        if "error" in info:
            L += [f"### {sname}", "", f"Not run: {info['error']}", ""]
            continue
        rows = [r for r in rob["rows"] if r["subset"] == sname]
        if not rows:
            continue
        modality = rows[0]["modality"]
        ref = info.get("reference")
        lo, hi = info["train_range"]
        L += [f"### {sname} ({modality.upper()})", "",
              f"Model `{Path(info['model']).name}`, trained on levels {lo:g}..{hi:g} ({info['range_source']}); "
              f"reference: {pretty(ref) if ref else 'none'} ({info['reference_status']}).", ""]
        conds: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
        for r in rows:
            conds.setdefault(r["cid"], []).append(r)
        body = []
        summary = []
        for cid, rs in conds.items():
            r0 = rs[0]
            rng = "--" if r0["in_range"] is None else ("inside" if r0["in_range"] else "OUTSIDE")
            vals = {k: _mean_of(rs, k) for k in ("psnr_noisy", "psnr_dualnet", "psnr_reference", "alpha_fg",
                                                  "sigma_fg", "true_std_fg", "total_std_fg")}
            diff = vals["psnr_dualnet"] - vals["psnr_reference"]
            ratio = vals["sigma_fg"] / vals["true_std_fg"] if vals["true_std_fg"] > 0 else float("nan")
            ratio_total = vals["sigma_fg"] / vals["total_std_fg"] if vals["total_std_fg"] > 0 else float("nan")
            body.append([r0["label"], rng, str(len(rs)), _fmt(vals["psnr_noisy"], 2), _fmt(vals["psnr_dualnet"], 2),
                         _fmt(vals["psnr_reference"], 2), _fmt(diff, 2), _fmt(vals["alpha_fg"]), _fmt(vals["sigma_fg"]),
                         _fmt(vals["true_std_fg"]), _fmt(ratio, 2), _fmt(ratio_total, 2)])
            summary.append((r0, vals, diff, ratio))
        L += _md_table(["condition", "training range", "n", "PSNR fg noisy", "PSNR fg DUAL-NET",
                        f"PSNR fg {pretty(ref) if ref else 'reference'}", "DUAL-NET - reference (dB)",
                        "NEB alpha (fg)", "NEB sigma (fg)", "true std (fg)", "sigma / true",
                        "sigma / (true with the scan's own)"], body)
        L += [""] + _robustness_sentences(summary, pretty(ref) if ref else None) + [""]
    return L


def _robustness_sentences(summary: Sequence[Tuple[Dict[str, Any], Dict[str, float], float, float]],
                          ref: Optional[str]) -> List[str]:
    """Plain statements: where NEB confidence drops, where its sigma is off, where DUAL-NET loses."""
    base = summary[0][1]["alpha_fg"] if summary else float("nan")
    out = []
    drops = [f"{r0['label']} (alpha {_fmt(v['alpha_fg'])})" for r0, v, _, _ in summary[1:]
             if np.isfinite(v["alpha_fg"]) and v["alpha_fg"] < base - ALPHA_DROP]
    alphas = [v["alpha_fg"] for _, v, _, _ in summary if np.isfinite(v["alpha_fg"])]
    if np.isfinite(base):
        out.append(f"- NEB confidence (alpha, fg) at the study level: {_fmt(base)}; it drops by more than {ALPHA_DROP:g} "
                   "under: " + ("; ".join(drops) if drops else
                                f"none of the other conditions (range {_fmt(min(alphas))}..{_fmt(max(alphas))} over "
                                "all conditions: the confidence map does not flag these shifts)") + ".")
    off = [f"{r0['label']} ({_fmt(ratio, 2)}x)" for r0, _, _, ratio in summary
           if np.isfinite(ratio) and abs(ratio - 1.0) > SIGMA_TOLERANCE]
    if off:
        out.append(f"- NEB sigma differs from the true noise std by more than {SIGMA_TOLERANCE:.0%} under: "
                   + "; ".join(off) + ".")
    if ref:
        worse = [f"{r0['label']} ({_fmt(d, 2)} dB)" for r0, _, d, _ in summary if np.isfinite(d) and d < 0]
        out.append(f"- DUAL-NET is below {ref} in PSNR (fg) under: " + ("; ".join(worse) if worse else "no condition") + ".")
    return out


# ----------------------------------------------------------------------------- calibration
CALIBRATION_COLUMNS = ["subset", "bin", "mean_std", "rmse", "ratio", "n"]


def calibration_plot(calib: Dict[str, Any], path: Path) -> Optional[Path]:
    """Per subset: RMSE of the error against the mean predicted std per std decile, identity line."""
    subs = {k: v for k, v in calib["subsets"].items() if v.get("bins")}
    if not subs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(subs), figsize=(3.6 * len(subs), 3.6), squeeze=False)
    for ax, (sname, c) in zip(axes[0], subs.items()):
        x = np.array([b["mean_std"] for b in c["bins"]])
        y = np.array([b["rmse"] for b in c["bins"]])
        top = float(max(x.max(), y.max())) * 1.1 or 1.0
        ax.plot([0, top], [0, top], "k--", lw=1, label="identity (calibrated)")
        ax.plot(x, y, "o-", label="deciles of predicted std")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("mean MC-dropout std (image units)", fontsize=8)
        ax.set_ylabel("RMSE of the error (image units)", fontsize=8)
        ax.set_title(f"{sname}: Spearman {_fmt(c['spearman'], 2)}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def calibration_lines(result, figdir: Path) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Markdown of the uncertainty-calibration section and the per-bin rows (``calibration.csv``)."""
    calib = result.calibration
    if not calib:
        return [], []
    from .evaluate import CALIBRATION_FACTOR

    ucfg = result.config.get("uncertainty", {})
    L = ["## Uncertainty calibration (MC dropout)", "",
         f"DUAL-NET with {calib['mc_samples']} Monte-Carlo dropout passes (`api.denoise_volume(..., uncertainty=True)`) "
         f"on the first {int(ucfg.get('cases', 2))} cases of each subset at its first study level. Over the foreground "
         "voxels of those cases (pooled): Pearson and Spearman correlation between the predicted per-voxel std and the "
         "absolute error |output - clean|; voxels binned by predicted std into deciles, and per bin the RMSE of the "
         "error against the mean predicted std (a calibrated std lies on the identity line). A subset is called "
         f"calibrated only if every decile's RMSE / std ratio lies within [{1 / CALIBRATION_FACTOR:.2f}, "
         f"{CALIBRATION_FACTOR:g}]. The std measures the spread of dropout passes only; the error also contains bias.", ""]
    body, rows, sentences = [], [], []
    for sname, c in calib["subsets"].items():
        sp = [pc["spearman"] for pc in c["cases"] if np.isfinite(pc["spearman"])]
        body.append([sname, f"{c['level']:g}", str(len(c["cases"])), str(c["n"]), _fmt(c["pearson"]),
                     _fmt(c["spearman"]), f"{_fmt(min(sp))}..{_fmt(max(sp))}" if sp else "--", _fmt(c["rmse"]),
                     _fmt(c["rms_std"]), _fmt(c["median_ratio"], 2), "calibrated" if c["calibrated"] else "POORLY calibrated"])
        for i, (b, r) in enumerate(zip(c["bins"], c["ratio"])):
            rows.append({"subset": sname, "bin": i, "mean_std": b["mean_std"], "rmse": b["rmse"], "ratio": r, "n": b["n"]})
        sentences.append(_calibration_sentence(sname, c))
    for sname, err in calib.get("errors", {}).items():
        sentences.append(f"- {sname}: not run ({err}).")
    if body:
        L += _md_table(["subset", "level", "cases", "voxels", "Pearson r", "Spearman rho", "per-case Spearman",
                        "RMSE", "RMS std", "RMSE / std (median decile)", "verdict"], body)
        L += [""]
    L += sentences + [""]
    fig = calibration_plot(calib, figdir / "calibration.png")
    if fig is not None:
        L += [f"![calibration](figures/{fig.name})", ""]
    return L, rows


def _calibration_sentence(sname: str, c: Dict[str, Any]) -> str:
    """One plain sentence on how well the std tracks and scales with the error."""
    rho = c["spearman"]
    track = ("does not vary (no correlation can be computed)" if not np.isfinite(rho) else
             "tracks the error well" if rho >= 0.5 else "tracks the error only moderately" if rho >= 0.3 else
             "hardly tracks the error")
    ratio = c["median_ratio"]
    if c["calibrated"]:
        scale = f"it is calibrated (RMSE / std within the tolerance in every decile, median {_fmt(ratio, 2)})"
    elif np.isfinite(ratio) and 1 / 1.05 <= ratio <= 1.05:
        scale = (f"its scale is right on average (median decile RMSE / std {_fmt(ratio, 2)}), but it is POORLY "
                 "calibrated: some deciles fall outside the tolerance")
    elif np.isfinite(ratio) and ratio > 1:
        scale = f"it is POORLY calibrated: it underestimates the actual RMSE by a factor of about {_fmt(ratio, 2)} (median decile)"
    elif np.isfinite(ratio):
        scale = f"it is POORLY calibrated: it overestimates the actual RMSE by a factor of about {_fmt(1 / ratio, 2)} (median decile)"
    else:
        scale = "its calibration cannot be assessed (zero std)"
    return f"- {sname}: the MC-dropout std {track} (Spearman {_fmt(rho, 2)}, Pearson {_fmt(c['pearson'], 2)}); {scale}."


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
    ablation_set = set(ablation_only(cfg))
    main_methods = [m for m in methods if m not in ablation_set]
    stats, focus_used = stats_rows(rows, main_methods, study["focus"], stat_metrics, alpha)
    _write_csv(out / "stats.csv", stats, STATS_COLUMNS)
    ceilings = ceiling_by_modality(cfg, getattr(result, "ceilings", {}) or {})

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
          "- Runtimes are wall-clock seconds of the method alone on this machine, all methods in the same run "
          "(cached cases keep the runtime of the run that computed them); for per-case fine-tuned methods they "
          "include the fine-tuning (also shown separately in `seconds_finetune`).", ""]

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
          "- Dice (downstream task): a frozen classical segmenter (`dualnet.segment`), fitted once per subset on the "
          "clean LR references with the reference labels resampled to the LR grid, is applied unchanged to every "
          "method's output; `dice` compares its prediction with the REFERENCE LABELS on the LR grid (mean over the "
          "target structures present in the case's reference labels; a structure absent from them is not scored). "
          "`noisy` gives the floor; the segmenter applied to the clean LR reference itself gives the ceiling (row "
          "*clean reference* in the results tables, and the Frozen segmenters section). The reference labels are "
          "automatic (FreeSurfer-style, TotalSegmentator) or manual (ultrasound) segmentations, not ground truth. "
          "Secondary column `dice_agree` (Dice vs clean seg.): Dice between the prediction on the output and the "
          "prediction on the clean reference (how far denoising moves the segmentation).",
          "- Statistical unit: the case (a slab of a volume, or a group of ultrasound frames); slices and voxels "
          "are never counted as samples. Slabs of one scan are not independent patients: the p values describe "
          "these cases, not a population.",
          f"- Tests: for each modality, level and metric the method under test is compared with every other method: "
          f"from {MIN_CASES_TEST_CHOICE} cases on, Shapiro-Wilk on the paired differences (alpha {alpha:g}) picks a "
          "paired t-test (t-based 95% CI) or a Wilcoxon signed-rank test (BCa bootstrap 95% CI of the mean "
          f"difference, fixed seed); with fewer cases the paired t-test (Shapiro-Wilk has no power there, and "
          "the exact Wilcoxon p cannot go below 2/2^n: 0.125 at 4 cases). Holm's correction across the "
          "baselines of each family (not the method's own variants such as its per-case fine-tuning, and a method "
          "giving the very same values as another only once: BM4D runs BM3D on 2D ultrasound); d_z = mean "
          f"difference / SD of differences. A comparison needs at least {MIN_CASES} cases with a value for both "
          "methods (e.g. Dice only counts cases whose labels contain the structure; families with fewer are listed "
          "as not tested). SSIM counts the voxels whose whole 7-voxel window lies inside the image: on a "
          "12-slice slab only its 2 central slices, so `ssim_all` of the thin CT slabs describes their middle.",
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
    notes = [(s["name"], str(s["note"]).strip()) for s in cfg["subset"] if s.get("note")]
    if notes:
        L += ["Notes on the references:", ""] + [f"- {n}: {t}" for n, t in notes] + [""]
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
    show = [c for c in ("psnr_fg", "psnr_all", "ssim_fg", "ssim_all", "rmse_fg", "dice", "dice_agree", "seconds",
                        "seconds_finetune") if c in mcols]
    for (modality, level), _ in families(rows).items():
        L += [f"### {modality.upper()}, level {level:g}", ""]
        body = []
        for r in summ:
            if r["modality"] == modality and float(r["level"]) == level:
                body.append([pretty(r["method"]), str(r["n_cases"])] + [_pm(r[f"{c}_mean"], r[f"{c}_sd"]) + (
                    f" (n {r[f'{c}_n']})" if 0 < r.get(f"{c}_n", r["n_cases"]) < r["n_cases"] else "") for c in show])
        if modality in ceilings and "dice" in show:
            c = ceilings[modality]
            body.append(["*clean reference* (Dice ceiling)", str(c["n"])] +
                        [f"{_fmt(c['mean'])} ± {_fmt(c['sd'])}" if col == "dice" else "--" for col in show])
        L += _md_table(["method", "n"] + [METRIC_LABELS.get(c, c) for c in show], body)
        L += [""]
    extra = [c for c in mcols if c.startswith("dice_")]
    if extra:
        L += ["Per-label Dice columns (" + ", ".join(f"`{c}`" for c in extra) + ") are in `cases.csv` and `summary.csv`.", ""]

    L += ["## Paired statistics (unit: case)", ""]
    if ablation_set & set(methods):
        L += ["Ablation variants (" + ", ".join(f"`{m}`" for m in methods if m in ablation_set) + ") are left out of "
              "these families; they are compared with their full model in the Ablations section.", ""]
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
    untested = untested_families(rows, focus_used, stat_metrics, stats)
    if untested:
        L += ["Not tested:"] + untested + [""]

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

    abl_lines, abl_rows = ablation_lines(result, rows, alpha)
    L += abl_lines
    if abl_rows:
        _write_csv(out / "ablations.csv", abl_rows, ABLATION_COLUMNS)
    rob = getattr(result, "robustness", None)
    L += robustness_lines(result)
    if rob and rob.get("rows"):
        _write_csv(out / "robustness.csv", rob["rows"], ROBUST_COLUMNS)
    cal_lines, cal_rows = calibration_lines(result, figdir) if getattr(result, "calibration", None) else ([], [])
    L += cal_lines
    if cal_rows:
        _write_csv(out / "calibration.csv", cal_rows, CALIBRATION_COLUMNS)

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
        if ceilings:
            L += ["Dice of the segmenter on the clean LR references against the reference labels (the ceiling any "
                  "denoiser can reach with this segmenter; mean ± SD over cases):", ""]
            for mod, c in ceilings.items():
                labels = ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in c["per_label"].items())
                L += [f"- {mod.upper()}: {_fmt(c['mean'])} ± {_fmt(c['sd'])} (n = {c['n']} cases; {labels})"]
            L += [""]

    L += ["## Files", "", "`cases.csv` (one row per case and method, seeds averaged), `runs.csv` (per seed), "
          "`summary.csv`, `stats.csv`, `ablations.csv`, `robustness.csv`, `calibration.csv` (where configured), "
          "`figures/`, `cache/` (per-case JSON, reused on the next run).", ""]

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
