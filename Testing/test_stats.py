"""Tests of dualnet.stats: paired tests equal scipy, Holm by hand, CI coverage, d_z."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from dualnet import stats
from dualnet.errors import InputError

# Fixed samples: PSNR-like values of two methods on 10 cases.
A = np.array([30.1, 31.4, 29.8, 32.0, 30.7, 31.1, 29.5, 30.9, 31.8, 30.2])
B = np.array([29.6, 30.9, 29.9, 31.2, 30.1, 30.8, 29.0, 30.1, 31.0, 30.0])


def test_paired_t_matches_scipy():
    res = stats.paired_test(A, B, normality="t")
    ref = sps.ttest_rel(A, B)
    assert res.test == "paired t"
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.p == pytest.approx(ref.pvalue)
    d = A - B
    assert res.mean_diff == pytest.approx(d.mean())
    assert res.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    half = sps.t.ppf(0.975, 9) * d.std(ddof=1) / np.sqrt(10)
    assert (res.ci_low, res.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert res.n == 10
    assert res.normality_p == pytest.approx(sps.shapiro(d).pvalue)


def test_wilcoxon_matches_scipy():
    res = stats.paired_test(A, B, normality="wilcoxon")
    ref = sps.wilcoxon(A, B)
    assert res.test == "wilcoxon"
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.p == pytest.approx(ref.pvalue)
    assert res.ci_low <= res.mean_diff <= res.ci_high
    again = stats.paired_test(A, B, normality="wilcoxon")  # fixed bootstrap seed
    assert (again.ci_low, again.ci_high) == (res.ci_low, res.ci_high)


def test_shapiro_picks_the_test():
    rng = np.random.default_rng(1)
    b = rng.normal(0, 1, 20)
    normal = stats.paired_test(b + rng.normal(0.5, 1, 20), b)
    assert normal.normality_p >= 0.05 and normal.test == "paired t"
    skew = b.copy()
    skew_a = b + np.r_[np.full(17, 0.1), [8.0, 9.0, 12.0]]  # heavy outliers -> not normal
    res = stats.paired_test(skew_a, skew)
    assert res.normality_p < 0.05 and res.test == "wilcoxon"
    assert res.p == pytest.approx(sps.wilcoxon(skew_a, skew).pvalue)


def test_nan_pairs_dropped_and_errors():
    a = np.r_[A, np.nan]
    b = np.r_[B, 1.0]
    assert stats.paired_test(a, b, normality="t").n == 10
    with pytest.raises(InputError):
        stats.paired_test([1.0], [2.0])
    with pytest.raises(InputError):
        stats.paired_test([1.0, 2.0], [1.0])
    same = stats.paired_test(A, A)
    assert same.p == 1.0 and same.mean_diff == 0.0


def test_holm_hand_example():
    # Hand-worked (Holm 1979 step-down), m = 4:
    # sorted p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06 monotone)
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm_bonferroni(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN kept and not counted
    adj = stats.holm_bonferroni([0.5, np.nan, 0.6])
    assert adj[0] == pytest.approx(1.0) and np.isnan(adj[1]) and adj[2] == pytest.approx(1.0)
    assert stats.holm_bonferroni([]) == []


def test_ci_coverage_simulation():
    rng = np.random.default_rng(2024)
    true = 0.7
    hits = 0
    trials = 400
    for _ in range(trials):
        b = rng.normal(30, 2, 12)
        a = b + rng.normal(true, 1.0, 12)
        res = stats.paired_test(a, b, normality="t")
        hits += res.ci_low <= true <= res.ci_high
    assert 0.92 <= hits / trials <= 0.98


def test_compare_methods_holm_and_direction():
    rng = np.random.default_rng(3)
    base = rng.normal(30, 1, 8)
    table = {"noisy": base, "gaussian": base + 1 + rng.normal(0, 0.2, 8), "nlm": base + 0.05 + rng.normal(0, 0.2, 8)}
    res = stats.compare_methods(table, "noisy")
    assert [r.method for r in res] == ["gaussian", "nlm"]
    assert all(r.reference == "noisy" for r in res)
    assert res[0].mean_diff > 0.5
    assert [r.p_holm for r in res] == pytest.approx(stats.holm_bonferroni([r.p for r in res]))
    flipped = stats.compare_methods(table, "noisy", reference_first=True)
    assert flipped[0].mean_diff == pytest.approx(-res[0].mean_diff)
    with pytest.raises(InputError):
        stats.compare_methods(table, "bm4d")


def test_bootstrap_ci_on_scipy_before_1_15(monkeypatch):
    """scipy < 1.15 (allowed: scipy>=1.10) has ``random_state``, not ``rng``: the call raised
    TypeError, which was swallowed, and every Wilcoxon CI came out as [mean, mean] ("degenerate")."""
    import scipy.stats

    real = scipy.stats.bootstrap

    def old_bootstrap(data, statistic, *, n_resamples=9999, confidence_level=0.95, method="BCa",
                      random_state=None):
        return real(data, statistic, n_resamples=n_resamples, confidence_level=confidence_level, method=method,
                    rng=random_state)

    d = np.array([0.3, -0.1, 0.8, 1.2, 0.05, 0.4, 2.0, 0.6])
    now = stats._bootstrap_ci(d, 0.95)
    monkeypatch.setattr(scipy.stats, "bootstrap", old_bootstrap)
    old = stats._bootstrap_ci(d, 0.95)
    assert old == now and old[0] < d.mean() < old[1] and old[2] == "bootstrap BCa"


def test_few_cases_always_get_the_paired_t_test():
    """Review, session 35: at the study's 4 cases Shapiro-Wilk picked Wilcoxon for non-normal differences,
    whose exact p cannot go below 2/2^4 = 0.125: DUAL-NET 4.63 dB above NLM on every slab read as "not
    significantly better" (Holm p 0.34), with a bootstrap CI that cannot reach past the extreme differences."""
    a = np.array([4.29, 4.73, 4.75, 4.74]) + 30.0  # the study's MRI 5 % differences against NLM
    b = np.full(4, 30.0)
    res = stats.paired_test(a, b)
    assert res.test == "paired t" and res.normality_p < 0.05 and res.p < 1e-3
    assert res.ci_low < 4.29 + 0.0  # the t CI may reach past the smallest difference
    many = np.r_[np.zeros(9), 5.0]  # from 10 cases on Shapiro-Wilk chooses again
    assert stats.paired_test(many + 1.0, np.zeros(10)).test == "wilcoxon"


def test_report_families_leave_out_variants_and_aliases_and_say_what_was_not_tested():
    from dualnet import report

    rows = []
    for case, (dn, ft, bm3d, nlm, dice) in enumerate([(33.0, 33.0, 31.0, 29.0, 0.8), (34.0, 34.0, 31.5, 29.5, None),
                                                      (33.5, 33.5, 31.2, 29.1, None), (34.2, 34.2, 31.9, 29.9, 0.7)]):
        for method, v in (("dualnet", dn), ("dualnet_ft", ft), ("bm3d", bm3d), ("bm4d", bm3d), ("nlm", nlm)):
            row = {"subset": "s", "modality": "us", "case": f"c{case}", "level": 4.0, "method": method, "psnr_fg": v}
            if dice is not None:
                row["dice"] = dice
            rows.append(row)
    methods = ["dualnet", "dualnet_ft", "bm3d", "bm4d", "nlm"]
    out, used = report.stats_rows(rows, methods, ["dualnet", "dualnet_ft"], ["psnr_fg", "dice"], 0.05)
    assert sorted(r["baseline"] for r in out) == ["bm3d", "nlm"]  # not the fine-tuned variant, BM4D = BM3D once
    fallback, _ = report.stats_rows(rows, methods, ["dualnet", "dualnet_ft", "nlm"], ["psnr_fg"], 0.05)
    assert "nlm" in {r["baseline"] for r in fallback}  # a later method of the focus list is still a baseline
    assert report.untested_families(rows, used, ["psnr_fg", "dice"], out) == [
        "- US level 4, dice: 2 case(s) with a value, fewer than 3: not tested (see the results table)."]
    summary = report.summary_rows(rows, methods)
    assert summary[0]["n_cases"] == 4 and summary[0]["dice_n"] == 2
