"""Paired statistics for comparing denoising methods, with the CASE as the unit.

One number per case (a volume, a slab of a volume, or a group of ultrasound frames of one
sequence) and method goes in; slices or voxels of one case are never treated as independent
samples. Repeated noise seeds of the same case should be averaged before testing.

Choices (stated in every report):

* Differences ``d = a - b`` per case. Normality of ``d`` by Shapiro-Wilk (needs n >= 3).
  If ``normality_p >= alpha`` (or the test cannot run), a paired t-test
  (``scipy.stats.ttest_rel``) with a t-based 95 % CI of the mean difference; otherwise the
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped as in Wilcoxon's
  original method) with a 95 % bootstrap CI of the mean difference (BCa, 9999 resamples, fixed
  seed 12345; percentile bootstrap when BCa is degenerate).
* Effect size ``d_z = mean(d) / sd(d)`` (sd with n - 1), Cohen's d for paired samples;
  ``nan`` when sd is 0.
* Several comparisons in one family (one metric, one modality / noise level, one focus method
  against every baseline) are corrected with Holm's step-down method (Holm 1979).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Sequence

import numpy as np

from .errors import InputError

#: Seed of the bootstrap used for Wilcoxon confidence intervals (results are reproducible).
BOOTSTRAP_SEED = 12345
BOOTSTRAP_RESAMPLES = 9999


@dataclass
class PairedResult:
    """Outcome of one paired comparison (unit: case).

    Attributes:
        test: ``"paired t"`` or ``"wilcoxon"``.
        statistic: t statistic, or Wilcoxon's W (the smaller of the signed-rank sums).
        p: two-sided p value (uncorrected).
        mean_diff: mean of ``a - b`` over cases (units of the metric).
        ci_low, ci_high: 95 % confidence interval of ``mean_diff``.
        d_z: mean(d) / sd(d), standardised paired effect size.
        n: number of cases (pairs with a NaN dropped).
        normality_p: Shapiro-Wilk p of the differences (nan when n < 3 or d constant).
        p_holm: Holm-adjusted p within its family (filled by :func:`compare_methods`).
        method, reference: names of what was compared (filled by :func:`compare_methods`).
        ci_method: how the CI was obtained (``"t"``, ``"bootstrap BCa"``, ``"bootstrap percentile"``).
    """

    test: str
    statistic: float
    p: float
    mean_diff: float
    ci_low: float
    ci_high: float
    d_z: float
    n: int
    normality_p: float
    p_holm: float = float("nan")
    method: str = ""
    reference: str = ""
    ci_method: str = ""

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _clean_pairs(a: Sequence[float], b: Sequence[float]):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"paired samples differ in length: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _bootstrap_ci(d: np.ndarray, confidence: float):
    from scipy import stats

    if np.ptp(d) == 0:
        m = float(d.mean())
        return m, m, "degenerate (all differences equal)"
    import inspect

    # scipy >= 1.15 takes ``rng``; the versions before it (scipy >= 1.10 is supported) ``random_state``
    seed_arg = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = stats.bootstrap(
                    (d,),
                    np.mean,
                    confidence_level=confidence,
                    n_resamples=BOOTSTRAP_RESAMPLES,
                    method=method,
                    **{seed_arg: np.random.default_rng(BOOTSTRAP_SEED)},
                )
            except (ValueError, FloatingPointError):  # pragma: no cover - scipy refuses BCa on some tiny samples
                continue
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi, f"bootstrap {method}"
    return float("nan"), float("nan"), "not available (the bootstrap failed)"  # pragma: no cover


#: Fewest cases for which Shapiro-Wilk picks the test. Below it the check has almost no power, the
#: exact two-sided Wilcoxon p cannot go below 2 / 2^n (0.125 at 4 cases: never significant) and its
#: bootstrap CI cannot reach past the smallest and largest difference (77 % coverage at 4 cases in a
#: simulation); the paired t-test and its t CI are used there.
MIN_CASES_TEST_CHOICE = 10


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alpha: float = 0.05,
    normality: str = "shapiro",
    confidence: float = 0.95,
) -> PairedResult:
    """Paired comparison of two methods measured on the same cases.

    Args:
        a, b: one value per case (e.g. PSNR in dB of method A and method B on case i); cases
            where either is NaN are dropped. The unit is the case, never the slice.
        alpha: significance level of the Shapiro-Wilk normality check that picks the test.
        normality: ``"shapiro"`` (choose by Shapiro-Wilk from :data:`MIN_CASES_TEST_CHOICE` cases on;
            with fewer the paired t), ``"t"`` (always paired t) or ``"wilcoxon"`` (always Wilcoxon
            signed-rank).
        confidence: level of the confidence interval of the mean difference (0.95).

    Returns:
        :class:`PairedResult` with ``mean_diff = mean(a - b)``.
    """
    from scipy import stats

    if normality not in ("shapiro", "t", "wilcoxon"):
        raise InputError(f"normality must be 'shapiro', 't' or 'wilcoxon', got {normality!r}")
    a, b = _clean_pairs(a, b)
    n = int(a.size)
    if n < 2:
        raise InputError(f"a paired test needs at least 2 cases with finite values, got {n}")
    d = a - b
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    d_z = mean / sd if sd > 0 else float("nan")

    normality_p = float("nan")
    if n >= 3 and np.ptp(d) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            normality_p = float(stats.shapiro(d).pvalue)

    if normality == "t":
        use_t = True
    elif normality == "wilcoxon":
        use_t = False
    else:  # too few cases for the check to mean anything, or for Wilcoxon to reach alpha: the paired t
        use_t = n < MIN_CASES_TEST_CHOICE or not (np.isfinite(normality_p) and normality_p < alpha)

    if use_t:
        if sd == 0:
            stat, p = (0.0, 1.0) if mean == 0 else (math.copysign(float("inf"), mean), 0.0)
            lo = hi = mean
        else:
            res = stats.ttest_rel(a, b)
            stat, p = float(res.statistic), float(res.pvalue)
            half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
            lo, hi = mean - half, mean + half
        return PairedResult("paired t", stat, p, mean, lo, hi, d_z, n, normality_p, ci_method="t")

    if np.all(d == 0):
        stat, p = 0.0, 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.wilcoxon(a, b)
        stat, p = float(res.statistic), float(res.pvalue)
    lo, hi, how = _bootstrap_ci(d, confidence)
    return PairedResult("wilcoxon", stat, p, mean, lo, hi, d_z, n, normality_p, ci_method=how)


def holm_bonferroni(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p values, in the input order.

    With the m finite p values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j) p(j))``
    (0-based j): monotone in the sorted order and capped at 1. NaN entries stay NaN and do not
    count towards m. Reject H_i at level alpha when ``p_adj(i) <= alpha``.
    """
    p = np.asarray(list(pvalues), dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out.tolist()
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise InputError("p values must lie in [0, 1]")
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out.tolist()


def compare_methods(
    table: Mapping[str, Sequence[float]],
    reference: str,
    *,
    alpha: float = 0.05,
    normality: str = "shapiro",
    reference_first: bool = False,
) -> List[PairedResult]:
    """Compare every method in ``table`` with ``reference``; Holm across these comparisons.

    Args:
        table: ``{method: values}``, one value per case in the same case order for every method
            (unit: the case). NaN values drop that case from the comparison that has them.
        reference: the method every other one is compared with.
        alpha: passed to :func:`paired_test`.
        normality: passed to :func:`paired_test`.
        reference_first: False -> ``paired_test(table[m], table[reference])`` (mean_diff =
            method - reference); True -> ``paired_test(table[reference], table[m])``
            (mean_diff = reference - method, e.g. "proposed minus each baseline").

    Returns:
        One :class:`PairedResult` per other method (in ``table`` order) with ``method``,
        ``reference`` and ``p_holm`` (Holm over this family) filled.
    """
    if reference not in table:
        raise InputError(f"reference method {reference!r} is not in the table ({', '.join(table)})")
    results: List[PairedResult] = []
    for name, values in table.items():
        if name == reference:
            continue
        if reference_first:
            res = paired_test(table[reference], values, alpha=alpha, normality=normality)
        else:
            res = paired_test(values, table[reference], alpha=alpha, normality=normality)
        res.method = name
        res.reference = reference
        results.append(res)
    for res, adj in zip(results, holm_bonferroni([r.p for r in results])):
        res.p_holm = adj
    return results
