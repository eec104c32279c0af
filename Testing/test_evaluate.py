"""Tests of the study runner (dualnet.evaluate) and its report (dualnet.report).

The CI study (configs/study_ci.toml) runs on small crops of the real scans. When the degrade or
baselines modules are not importable, tiny local stand-ins are injected through the hooks.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from dualnet import evaluate, report
from dualnet.errors import CancelledError, InputError
from dualnet.progress import CancelToken

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "DualNetDenoise" / "dualnet" / "configs" / "study_ci.toml"
FULL_CONFIG = REPO / "DualNetDenoise" / "dualnet" / "configs" / "study.toml"


# ----------------------------------------------------------------------------- stand-ins
class _Deg:
    def __init__(self, noisy_lr, clean_lr, clean_hr, spacing_lr_zyx, level, modality):
        self.noisy_lr, self.clean_lr, self.clean_hr = noisy_lr, clean_lr, clean_hr
        self.spacing_lr_zyx, self.level, self.modality = spacing_lr_zyx, level, modality


def fake_degrade(clean, modality, level, *, lr_factor=2, anisotropy=None, spacing_zyx=None, blur_fwhm=None, rng=None):
    """Block-average downsampling plus Gaussian noise (a stand-in with degrade's signature)."""
    f = int(lr_factor)
    x = np.asarray(clean, dtype=np.float64)
    shape = [s // f * f for s in x.shape]
    x = x[tuple(slice(0, s) for s in shape)]
    lr = x.reshape([v for s in shape for v in (s // f, f)]).mean(axis=tuple(range(1, 2 * x.ndim, 2)))
    g = np.random.default_rng(rng)
    scale = 0.05 * (lr.max() - lr.min() + 1.0)
    sp = tuple(s * f for s in (spacing_zyx or (1.0,) * x.ndim))
    return _Deg((lr + g.normal(0, scale, lr.shape)).astype(np.float32), lr.astype(np.float32), x, sp, level, modality)


def fake_denoise(array, method, modality, *, sigma=None, spacing_zyx=None, progress=None, cancel=None):
    from scipy import ndimage

    s = {"gaussian": 1.0, "nlm": 0.7}.get(method, 0.5)
    return ndimage.gaussian_filter(np.asarray(array, np.float32), s)


def _use_real_or_standins(monkeypatch) -> None:
    try:
        evaluate._load_degrade()
    except ImportError:
        monkeypatch.setattr(evaluate, "_load_degrade", lambda: fake_degrade)
    try:
        evaluate._load_baselines_denoise()
    except ImportError:
        monkeypatch.setattr(evaluate, "_load_baselines_denoise", lambda: fake_denoise)


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- the CI study
@pytest.fixture(scope="module")
def ci_study(tmp_path_factory, shared_data):
    mp = pytest.MonkeyPatch()
    _use_real_or_standins(mp)
    out = tmp_path_factory.mktemp("study_ci")
    calls = []
    path = evaluate.run_study(CI_CONFIG, out, data_dir=shared_data, command="dualnet evaluate --config study_ci.toml",
                              progress=lambda f, m: calls.append((f, m)))
    yield out, path, calls, mp
    mp.undo()


def test_ci_report_structure(ci_study):
    out, path, calls, _ = ci_study
    assert path == out / "report.md"
    md = path.read_text(encoding="utf-8")
    for heading in ("## How this was run", "## Protocol", "## Data and cases", "## Methods",
                    "## Results (mean ± SD over cases)", "## Paired statistics (unit: case)",
                    "## Where the method under test does not beat a baseline", "## Figures", "## Frozen segmenters",
                    "## Robustness: noise levels outside the training range and mis-specified noise",
                    "## Uncertainty calibration (MC dropout)"):
        assert heading in md, heading
    # Dice against the reference labels, with the clean-reference ceiling stated
    assert "REFERENCE LABELS" in md and "*clean reference* (Dice ceiling)" in md and "Dice vs clean seg." in md
    # robustness: the study level (inside the training range) and the out-of-range / mis-specified conditions
    assert "| mri noise, level 0.08 (study level) | inside |" in md and "| mri noise, level 0.2 | OUTSIDE |" in md
    assert "speckle noise, std of level 0.08" in md and "NEB alpha (fg)" in md
    assert "![calibration](figures/calibration.png)" in md and "calibrated" in md
    assert "dualnet evaluate --config study_ci.toml" in md
    assert "numpy" in md and "torch" in md and "bm4d" in md and "cpu_count" in md
    for modality in ("MRI", "CT", "US"):
        assert f"### {modality}, level" in md
    assert "| method | n | PSNR fg (dB)" in md and "±" in md
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<table>" in html and "<img" in html
    # progress went from 0 to 1, monotone
    fr = [f for f, _ in calls]
    assert fr[0] == 0.0 and fr[-1] == 1.0 and all(b >= a for a, b in zip(fr, fr[1:]))


def test_ci_csv_and_figures(ci_study):
    out, _, _, _ = ci_study
    rows = _read_csv(out / "cases.csv")
    assert len(rows) == 3 * 3 * 3  # 3 subsets x 3 cases x 3 methods, one seed
    assert {r["method"] for r in rows} == {"noisy", "gaussian", "nlm"}
    for r in rows:
        assert math.isfinite(float(r["psnr_fg"])) and 0 < float(r["ssim_fg"]) <= 1
        if r["subset"] == "ct_abdomen" and r["case"] == "slab0":
            assert math.isnan(float(r["dice"]))  # no liver in the reference labels: not scored
        else:
            assert 0 <= float(r["dice"]) <= 1 and 0 <= float(r["dice_agree"]) <= 1
    # denoising helps on average over all cases (PSNR over the foreground)
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(float(r["psnr_fg"]))
    assert np.mean(by["nlm"]) > np.mean(by["noisy"])
    summary = _read_csv(out / "summary.csv")
    assert {"psnr_fg_mean", "psnr_fg_sd", "dice_mean", "n_cases"} <= set(summary[0])
    assert len(summary) == 3 * 3
    stats_rows = _read_csv(out / "stats.csv")
    assert set(report.STATS_COLUMNS) <= set(stats_rows[0])
    assert {r["baseline"] for r in stats_rows} == {"noisy", "gaussian"}
    assert {r["focus"] for r in stats_rows} == {"nlm"}
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len([f for f in figs if f.startswith("box_")]) == 3
    assert len([f for f in figs if f.startswith("panel_")]) == 3
    assert "calibration.png" in figs
    assert all((out / "figures" / f).stat().st_size > 1000 for f in figs)
    rob = _read_csv(out / "robustness.csv")
    assert len(rob) == 5  # 1 MRI case x (study level, 2 out-of-range levels, 2 mis-specified noises)
    for r in rob:
        for k in ("psnr_noisy", "psnr_dualnet", "psnr_reference", "alpha_fg", "sigma_fg", "true_std_fg"):
            assert math.isfinite(float(r[k])), k
        assert 0 <= float(r["alpha_fg"]) <= 1 and float(r["sigma_fg"]) > 0
    # the true std grows with the level; out-of-range flags follow the model's training range (0.002..0.15 for the shipped v2 model)
    by_level = {float(r["level"]): r for r in rob if r["kind"] == "level"}
    assert float(by_level[0.001]["true_std_fg"]) < float(by_level[0.08]["true_std_fg"]) < float(by_level[0.2]["true_std_fg"])
    assert [by_level[v]["in_range"] for v in (0.001, 0.08, 0.2)] == ["False", "True", "False"]
    cal = _read_csv(out / "calibration.csv")
    assert 5 <= len(cal) <= 10 and all(float(r["mean_std"]) >= 0 and float(r["rmse"]) > 0 for r in cal)


def test_ci_stats_equal_scipy(ci_study):
    """Every p value in stats.csv is what scipy gives on the numbers in cases.csv."""
    out, _, _, _ = ci_study
    cases = _read_csv(out / "cases.csv")
    stats_rows = _read_csv(out / "stats.csv")
    assert stats_rows
    families = defaultdict(list)
    for s in stats_rows:
        sel = [r for r in cases if r["modality"] == s["modality"] and float(r["level"]) == float(s["level"])]
        keyed = {m: {(r["subset"], r["case"]): float(r[s["metric"]]) for r in sel if r["method"] == m}
                 for m in (s["focus"], s["baseline"])}
        keys = sorted(keyed[s["focus"]])
        a = np.array([keyed[s["focus"]][k] for k in keys])
        b = np.array([keyed[s["baseline"]][k] for k in keys])
        keep = np.isfinite(a) & np.isfinite(b)  # cases without a score drop out of that comparison
        a, b = a[keep], b[keep]
        assert int(s["n"]) == a.size >= 2
        assert float(s["mean_diff"]) == pytest.approx(np.mean(a - b))
        if np.all(a == b):
            assert float(s["p"]) == 1.0
        elif s["test"] == "paired t":
            ref = sps.ttest_rel(a, b)
            assert float(s["statistic"]) == pytest.approx(ref.statistic)
            assert float(s["p"]) == pytest.approx(ref.pvalue)
        else:
            ref = sps.wilcoxon(a, b)
            assert float(s["statistic"]) == pytest.approx(ref.statistic)
            assert float(s["p"]) == pytest.approx(ref.pvalue)
        families[(s["modality"], s["level"], s["metric"])].append(s)
    from dualnet.stats import holm_bonferroni

    for fam in families.values():
        adj = holm_bonferroni([float(s["p"]) for s in fam])
        assert [float(s["p_holm"]) for s in fam] == pytest.approx(adj)
    # the Markdown shows the same Holm p values
    md = (out / "report.md").read_text(encoding="utf-8")
    for s in stats_rows:
        assert report._fmt_p(float(s["p_holm"])) in md


def test_ci_resume_uses_cache(ci_study, shared_data, monkeypatch):
    out, _, _, _ = ci_study
    before = (out / "cases.csv").read_text(encoding="utf-8")

    def boom(arr, ctx):
        raise AssertionError("method called although its result is cached")

    for name in ("noisy", "gaussian", "nlm"):
        spec = evaluate.REGISTRY[name]
        monkeypatch.setitem(evaluate.REGISTRY, name, evaluate.MethodSpec(name, boom, spec.check, spec.description))

    def boom_case(*args, **kwargs):
        raise AssertionError("robustness / calibration recomputed although cached")

    monkeypatch.setattr(evaluate, "_robust_case", boom_case)
    monkeypatch.setattr(evaluate, "_calibration_case", boom_case)
    path = evaluate.run_study(CI_CONFIG, out, data_dir=shared_data, command="again")
    md = path.read_text(encoding="utf-8")
    assert "Cases computed now: 0; reused from `cache/`: 27" in md
    assert (out / "cases.csv").read_text(encoding="utf-8") == before


# ----------------------------------------------------------------------------- synthetic data
def _synthetic_data(root: Path) -> Path:
    """A 32x48x48 MRI-like phantom with FreeSurfer-style labels, written as NIfTI."""
    from dualnet.io import Volume, write_volume

    (root / "mri").mkdir(parents=True)
    z, y, x = np.ogrid[:32, :48, :48]
    r = np.sqrt((z - 16) ** 2 + (y - 24) ** 2 + (x - 24) ** 2)
    lab = np.zeros((32, 48, 48), np.uint8)
    lab[r < 15] = 3
    lab[r < 10] = 2
    lab[r < 4] = 4
    img = np.select([lab == 2, lab == 3, lab == 4], [300.0, 200.0, 60.0], 10.0).astype(np.float32)
    write_volume(Volume(img), root / "mri" / "phantom.nii.gz")
    write_volume(Volume(lab), root / "mri" / "phantom_labels.nii.gz")
    return root


CONFIG_TEMPLATE = """
[study]
name = "synthetic"
seeds = [0, 1]
methods = {methods}
focus = ["dualnet", "gaussian"]
[methods.dualnet_ft]
base = "dualnet"
model = "no_such_model.safetensors"
[[subset]]
name = "phantom"
modality = "mri"
image = "mri/phantom.nii.gz"
labels = {{ kind = "freesurfer", file = "mri/phantom_labels.nii.gz" }}
slabs = 1
levels = [0.05]
lr_factor = 2
"""


def synthetic_study(tmp_path, monkeypatch, template: str):
    """Stand-in degrade/denoise, a synthetic data folder, and ``write(methods, **fields)`` that
    renders ``template`` into ``tmp_path/study.toml``; returns ``(tmp_path, data_dir, write)``."""
    monkeypatch.setattr(evaluate, "_load_degrade", lambda: fake_degrade)
    monkeypatch.setattr(evaluate, "_load_baselines_denoise", lambda: fake_denoise)
    data = _synthetic_data(tmp_path / "data")

    def write(methods, **fields):
        cfg = tmp_path / "study.toml"
        cfg.write_text(template.format(methods=methods, **fields), encoding="utf-8")
        return cfg

    return tmp_path, data, write


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    return synthetic_study(tmp_path, monkeypatch, CONFIG_TEMPLATE)


def test_unavailable_and_failing_methods_are_reported(synthetic, monkeypatch):
    tmp, data, write = synthetic

    def broken(arr, ctx):
        raise RuntimeError("kaputt")

    monkeypatch.setitem(evaluate.REGISTRY, "broken", evaluate.MethodSpec("broken", broken))
    monkeypatch.setitem(evaluate.REGISTRY, "bm4d", evaluate.MethodSpec(
        "bm4d", broken, lambda ctx: "package 'bm4d' not installed (optional baseline, non-commercial licence)"))
    cfg = write('["noisy", "gaussian", "bm4d", "dualnet_ft", "broken", "nonsense"]')
    md = evaluate.run_study(cfg, tmp / "out", data_dir=data).read_text(encoding="utf-8")
    assert "unavailable: package 'bm4d' not installed" in md
    assert "unavailable: model file" in md and "no_such_model.safetensors" in md
    assert "unavailable: failed on slab0 at level" in md and "(RuntimeError: kaputt)" in md
    assert "unavailable: unknown method name" in md
    rows = _read_csv(tmp / "out" / "cases.csv")
    assert {r["method"] for r in rows} == {"noisy", "gaussian"}
    assert all(r["n_seeds"] == "2" for r in rows)  # seeds averaged within the case
    assert len(_read_csv(tmp / "out" / "runs.csv")) == 4
    # one case only: no statistics, said plainly
    assert "No paired statistics" in md


def test_cancel_keeps_finished_cases(synthetic):
    tmp, data, write = synthetic
    cfg = write('["noisy", "gaussian"]')
    token = CancelToken()
    seen = []

    def progress(f, m):
        seen.append(m)
        if len(seen) == 3:  # after the first method result
            token.cancel()

    with pytest.raises(CancelledError):
        evaluate.run_study(cfg, tmp / "out", data_dir=data, progress=progress, cancel=token)
    cached = list((tmp / "out" / "cache").glob("phantom__*.json"))
    assert len(cached) >= 1
    md = evaluate.run_study(cfg, tmp / "out", data_dir=data).read_text(encoding="utf-8")
    assert f"reused from `cache/`: {len(cached)}" in md


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\nmethods = ['noisy']\n", encoding="utf-8")
    with pytest.raises(InputError, match="no \\[\\[subset\\]\\]"):
        evaluate.load_config(bad)
    bad.write_text("[study\n", encoding="utf-8")
    with pytest.raises(InputError, match="TOML"):
        evaluate.load_config(bad)
    with pytest.raises(InputError, match="not found"):
        evaluate.load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("subset_levels, robust, match", [
    ("[1.5]", "", "subset ct_x: ct noise level 1.5 must be in \\(0, 1\\]"),
    ("[0.25]", "[robustness]\nlevels = { ct = [0.05, 2.0] }\n", "robustness\\] levels.ct: ct noise level 2.0"),
    ("['high']", "", "not a number"),
])
def test_bad_noise_levels_fail_before_any_work(tmp_path, subset_levels, robust, match):
    """A study that would stop midway on a bad level (CT dose > 1) is refused when the config loads."""
    cfg = tmp_path / "study.toml"
    cfg.write_text("[study]\nmethods = ['noisy']\n" + robust +
                   f"[[subset]]\nname = 'ct_x'\nmodality = 'ct'\nimage = 'x.nii.gz'\nlevels = {subset_levels}\n",
                   encoding="utf-8")
    with pytest.raises(InputError, match=match):
        evaluate.load_config(cfg)


def test_shipped_configs_parse_and_case_counts(shared_data):
    full = evaluate.load_config(FULL_CONFIG)
    ci = evaluate.load_config(CI_CONFIG)
    assert "dualnet" in full["study"]["methods"] and "bm4d" in full["study"]["methods"]
    assert len(ci["study"]["methods"]) <= 3
    n = {}
    for s in full["subset"]:
        n[s["modality"]] = n.get(s["modality"], 0) + int(s.get("slabs", s.get("groups", 1)))
    assert n == {"mri": 4, "ct": 4, "us": 8}  # the case counts the config's comments state
    us = next(s for s in ci["subset"] if s["modality"] == "us")
    assert len(evaluate.load_cases(us, shared_data)) == 3
    # the full study keeps apart from the shipped models' training data (configs/pretrain_*.toml)
    images = {s.get("image") for s in full["subset"]}
    assert not images & {"mri/adni_mprage_t1.nii.gz", "ct/chest_ct.nii.gz"}
    us_full = next(s for s in full["subset"] if s["modality"] == "us")
    frames = [int(f) for c in evaluate.load_cases(us_full, shared_data)
              for f in c.source.split("(")[0].replace("frames", "").replace(",", " ").split()]
    assert len(frames) == 24 and min(frames) >= 170


def test_cli_parser_and_main(synthetic, capsys):
    tmp, data, write = synthetic
    cfg = write('["noisy", "gaussian"]')
    parser = argparse.ArgumentParser(prog="dualnet")
    sub = parser.add_subparsers(dest="command")
    evaluate.add_evaluate_parser(sub)
    args = parser.parse_args(["evaluate", "--config", str(cfg), "--out", str(tmp / "cli"), "--data-dir", str(data),
                              "--methods", "noisy,gaussian", "--quiet"])
    assert args.func is evaluate.evaluate_main
    assert evaluate.evaluate_main(args) == 0
    assert (tmp / "cli" / "report.md").exists()
    assert "report written to" not in capsys.readouterr().out  # --quiet


def test_markdown_to_html_escapes():
    html = report.markdown_to_html("# T <x>\n\n| a | b |\n|---|---|\n| `1<2` | ![p](f.png) |\n\n- item\n")
    assert "<h1>T &lt;x&gt;</h1>" in html
    assert "<code>1&lt;2</code>" in html and '<img alt="p" src="f.png">' in html and "<li>item</li>" in html
