"""Whole-scan check after fine-tuning: the fine-tuned model is kept only if SURE says it beats its base.

Fine-tuning selects its export by the self-supervised loss on a few fixed patches, the base (step 0)
included. With one input those patches come from the scan being fitted, and on a scan like the training
data that selection can keep a fine-tuned model that is worse than the base over the whole scan
(docs/design_sweep.md, session 27). This check runs both models the way ``dualnet denoise`` runs them
(their cards' views, view smoothing and test-time augmentation; no SURE guard) over whole scans and
compares Stein's unbiased risk estimate (SURE) of each result's squared error to the unknown clean scan.

For noise of per-voxel variance ``v_i`` (Gaussian; MRI above the Rician floor, low-dose CT in the image
domain), with ``f`` a whole pipeline, ``y`` the scan, ``b`` a standard normal probe and ``eps_i`` a tenth
of the noise std (Ramani et al. 2008)::

    SURE(f) = sum_i [(f_i - y_i)^2 - v_i + 2 v_i b_i (f(y + eps b)_i - f(y)_i) / eps_i] / n

summed over the same voxels for both models, with the same probe and the same variance: the noise
model at the scan's own 3x3x3 local mean, and the voxels the SURE guard would check there (MRI: more
than 3 noise stds above 0, where the Rician noise is Gaussian; CT: all but scanner fill values). Both
come from the scan, not from either result: a model that darkens the signal must not take its own
errors out of the sum, and a broken base must not leave nothing to check. Ultrasound speckle is
not Gaussian: no check there, the fine-tuned model stands.

Arrays are (z, y, x) (or (y, x)) in the scan's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..progress import CancelToken, ProgressFn, check_cancel, report, scaled


@dataclass
class Scan:
    """One scan to check: ``array`` (z, y, x) or (y, x) in scan units, its noise variance polynomial
    ``coef = (c0, c1, c2)`` (:func:`dualnet.training.data.noise_variance_model`) and voxel size in mm,
    (z, y, x)."""

    name: str
    array: np.ndarray
    coef: Tuple[float, float, float]
    spacing_zyx: Optional[Tuple[float, ...]] = None


#: a pipeline: ``run(data, scan) -> denoised``: ``data`` is the scan's array, or that array plus the
#: probe, to be denoised with the scan's noise model and geometry (same shape, scan units)
Pipeline = Callable[[np.ndarray, Scan], np.ndarray]


def model_pipeline(path: Any, modality: str, device: str = "cpu",
                   cancel: Optional[CancelToken] = None) -> Pipeline:
    """The model file at ``path`` as a :data:`Pipeline`, run the way ``dualnet denoise`` runs it (its
    card's views, view smoothing and test-time augmentation) but with no SURE guard, and given the
    scan's noise model and voxel size."""
    from .. import inference, modelfile

    net, card = modelfile.load_for_inference(path, device)

    def run(data: np.ndarray, scan: Scan) -> np.ndarray:
        return inference.denoise_array(data, net, card, device=device, noise_coef=scan.coef, modality=modality,
                                       guard=False, spacing_zyx=scan.spacing_zyx, cancel=cancel).denoised
    return run


def scan_sure(scan: Scan, modality: str, runs: Dict[str, Pipeline], seed: int = 0,
              progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """SURE of each pipeline in ``runs`` (name -> pipeline) on one scan, over the voxels where the
    scan's local mean lets the SURE guard check, with the noise variance at that mean.

    Args:
        scan: the scan and its noise model.
        modality: ``"mri"`` or ``"ct"``.
        runs: the pipelines, each run twice (on the scan and on the scan plus the probe); ``progress``
            hears of each of those passes.

    Returns:
        ``{"voxels": n, "mse_input": ..., "mse": {name: SURE per voxel, scan units^2}}``.
    """
    from .. import sure_guard as sg
    from ..inference import _fill_mask
    from .data import variance_at

    y = np.asarray(scan.array, dtype=np.float32)
    keep = ~_fill_mask(y) if modality == "ct" else None
    names = list(runs)
    outs: Dict[str, np.ndarray] = {}
    passes = 2 * len(names)
    for i, name in enumerate(names):
        check_cancel(cancel)
        report(progress, i / passes, f"{scan.name}: {name} model")
        outs[name] = np.asarray(runs[name](y, scan), dtype=np.float32)
    signal = ndimage.uniform_filter(y, size=3, mode="nearest")  # the scan's own signal, for both alike
    var = variance_at(signal, scan.coef)
    b, eps = sg.probe(y.shape, var, seed)
    if keep is not None:
        eps[~keep] = 0.0
    mask = sg.check_mask(modality, signal, var, keep)
    n = int(mask.sum())
    v, bb, e = var[mask].astype(np.float64), b[mask].astype(np.float64), eps[mask].astype(np.float64)
    yy = y[mask].astype(np.float64)
    perturbed_input = y + eps * b
    mse: Dict[str, float] = {}
    for i, name in enumerate(names):
        check_cancel(cancel)
        report(progress, (len(names) + i) / passes, f"{scan.name}: {name} model, probed")
        fp = np.asarray(runs[name](perturbed_input, scan), dtype=np.float32)
        f = outs[name][mask].astype(np.float64)
        div = np.sum(v * bb * (fp[mask].astype(np.float64) - f) / e)
        mse[name] = float((np.sum((f - yy) ** 2) - np.sum(v) + 2.0 * div) / max(n, 1))
    # a result with NaN / inf (a broken model) is never kept; None, so the card stays valid JSON
    return {"voxels": n, "mse_input": float(np.sum(v) / max(n, 1)),
            "mse": {k: (x if np.isfinite(x) else None) for k, x in mse.items()}}


def compare(scans: Sequence[Scan], runs: Dict[str, Pipeline], modality: str,
            seed: int = 0, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """:func:`scan_sure` over ``scans``, pooled per voxel.

    Returns ``{"scans": [per scan], "voxels": n, "mse_input": ..., "mse": {name: pooled SURE},
    "kept": the name with the lowest pooled SURE (ties: the first; a result that is not finite anywhere
    has SURE None and is never kept over a finite one)}``; with too few voxels to check
    (e.g. an MRI scan with no signal 3 stds above its noise) ``kept`` is the first and ``reason`` says why.
    """
    from .. import sure_guard as sg

    names = list(runs)
    per_scan: List[Dict[str, Any]] = []
    for k, scan in enumerate(scans):
        res = scan_sure(scan, modality, runs, seed + k, scaled(progress, k / len(scans), (k + 1) / len(scans)),
                        cancel)
        per_scan.append({"scan": scan.name, **res})
    n = sum(r["voxels"] for r in per_scan)
    out: Dict[str, Any] = {"scans": per_scan, "voxels": n}
    if n < sg.MIN_VOXELS:
        out.update(kept=names[0], reason=f"only {n} voxels to check (< {sg.MIN_VOXELS})")
        return out
    broken = {m for m in names if any(r["mse"][m] is None for r in per_scan)}
    pooled = {m: None if m in broken else sum(r["mse"][m] * r["voxels"] for r in per_scan) / n for m in names}
    rank = {m: (float("inf") if pooled[m] is None else pooled[m], names.index(m)) for m in names}
    out.update(mse_input=sum(r["mse_input"] * r["voxels"] for r in per_scan) / n, mse=pooled,
               kept=min(names, key=rank.__getitem__))
    return out
