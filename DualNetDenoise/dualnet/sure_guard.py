"""SURE guard: never hand back a result that is estimated to be worse than the input.

The network's output ``f(y)`` is blended with its input, ``g = w f(y) + (1 - w) y``, with the
weight ``w`` in [0, 1] that minimises Stein's unbiased risk estimate (SURE) of the squared error of
``g`` against the unknown noise-free image. For noise of per-voxel variance ``v_i`` (Gaussian;
MRI above the Rician floor, low-dose CT's Poisson-Gaussian noise in the image domain)::

    SURE(w) = w^2 A + 2 w (D - S) + S,   A = sum (f_i - y_i)^2,  S = sum v_i,
                                          D = sum v_i d f_i / d y_i
    w* = clip((S - D) / A, 0, 1)

``S`` is the input's own expected error, so ``w* < 1`` only where SURE finds the network's error
above what blending removes; on a scan like the training data ``w* = 1`` and nothing changes. The
divergence ``d f_i / d y_i`` is estimated by one Monte-Carlo finite difference (Ramani et al.
2008): ``b_i (f(y + eps b)_i - f(y)_i) / eps_i`` with ``b`` standard normal and ``eps_i`` a tenth
of the noise std, on 4 runs of slices spread over the volume (a quarter of it, at least 16
slices) so the check costs a fraction of a pass. Speckle (ultrasound) is not Gaussian: no guard there.

Arrays are (z, y, x) in the input's units; the noise variance is the polynomial of
:func:`dualnet.training.data.noise_variance_model` evaluated at the network's result
(:func:`dualnet.training.data.variance_at`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: modalities whose noise SURE's Gaussian model covers
GUARD_MODALITIES = ("mri", "ct")


#: finite-difference step, in noise stds
EPS = 0.1
#: the slices checked: this fraction of the volume, at least MIN_SLICES, in BLOCKS runs spread over it
FRACTION = 0.25
MIN_SLICES = 16
BLOCKS = 4
#: fewer voxels than this in the checked mask: too few for the estimate, the network's result stands
MIN_VOXELS = 2000
#: MRI: voxels whose denoised value is below this many noise stds are left out (Rician, not Gaussian)
MRI_MIN_SNR = 3.0


def unchecked_reason(modality: Optional[str], dim: int) -> Optional[str]:
    """Why the guard cannot check a network's result (None: it can): speckle is not Gaussian, and a
    3D model is not run slice by slice as the guard's probe pass is."""
    if modality not in GUARD_MODALITIES:
        return f"no Gaussian noise model for {modality!r} (speckle)"
    if dim != 2:
        return "3D model: not checked"
    return None


def guard_blocks(n_slices: int, context: int, n_blocks: int = BLOCKS, fraction: float = FRACTION
                 ) -> List[Tuple[int, int, int, int]]:
    """``[(z0, z1, lo, hi), ...]``: ``n_blocks`` runs of slices ``[z0, z1)`` spread evenly over the
    volume (together ``fraction`` of it, at least ``MIN_SLICES``; all of it when it is that small),
    each with ``[lo, hi)`` the slices the network must see for them (``context // 2`` more each
    side, clipped). Spread, not one central block: a model can fail at the ends of a volume.
    Each of three orthogonal views checks a third of :data:`FRACTION`: together they check as many
    slices as one view does."""
    k = min(n_slices, max(MIN_SLICES, math.ceil(n_slices * fraction)))
    h = max(int(context), 1) // 2
    if k >= n_slices:
        return [(0, n_slices, 0, n_slices)]
    n = max(1, min(int(n_blocks), k))
    size = math.ceil(k / n)
    blocks = []
    for i in range(n):
        centre = (i + 0.5) * n_slices / n
        z0 = int(min(max(round(centre - size / 2), 0), n_slices - size))
        z1 = z0 + size
        if blocks and z0 < blocks[-1][1]:  # no overlap with the previous run
            z0 = blocks[-1][1]
            z1 = min(z0 + size, n_slices)
        if z1 > z0:
            blocks.append((z0, z1, max(z0 - h, 0), min(z1 + h, n_slices)))
    return blocks


def probe(shape: Sequence[int], var: np.ndarray, seed: int, index: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(b, eps)`` for one slice (or block) ``index``: standard normal probe and per-voxel step
    ``EPS * sqrt(var)`` (float32); the same ``(seed, index)`` always gives the same probe."""
    b = np.random.default_rng([int(seed), 5417, int(index)]).standard_normal(tuple(shape), dtype=np.float32)
    return b, (EPS * np.sqrt(var)).astype(np.float32)


def check_mask(modality: str, denoised: np.ndarray, var: np.ndarray,
               keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Voxels the estimate sums over: MRI where the result is ``MRI_MIN_SNR`` stds above 0 (the
    Rician noise is Gaussian there), CT everywhere but ``keep``-excluded fill values."""
    mask = np.sqrt(var) > 0
    if modality == "mri":
        mask &= denoised > MRI_MIN_SNR * np.sqrt(var)
    if keep is not None:
        mask &= keep
    return mask


class SureSums:
    """Running sums of the SURE terms, slice by slice (no whole-volume arrays)."""

    def __init__(self) -> None:
        self.n, self.a, self.s, self.d = 0, 0.0, 0.0, 0.0

    def add(self, noisy: np.ndarray, denoised: np.ndarray, perturbed: np.ndarray, b: np.ndarray,
            eps: np.ndarray, var: np.ndarray, mask: np.ndarray) -> "SureSums":
        """Add one slice (or block): the input ``noisy``, the network's ``denoised`` and
        ``perturbed`` (its output for ``noisy + eps * b``), the probe ``b``, its step ``eps``, the
        noise variance ``var`` and the bool ``mask`` summed over (all one shape)."""
        y, f, fp, bb, e, v = (np.asarray(a, dtype=np.float64)[mask] for a in (noisy, denoised, perturbed, b, eps, var))
        self.n += int(y.size)
        self.a += float(np.sum((f - y) ** 2))
        self.s += float(np.sum(v))
        self.d += float(np.sum(v * bb * (fp - f) / e)) if y.size else 0.0
        return self

    def result(self) -> Dict[str, Any]:
        """The SURE-optimal blend weight and the estimates behind it (per-voxel MSE, input units^2)."""
        n, a, s, d = self.n, self.a, self.s, self.d
        if n < MIN_VOXELS:
            return {"weight": 1.0, "voxels": n, "reason": f"only {n} voxels to check (< {MIN_VOXELS})"}
        # a network that changed (almost) nothing: any weight gives the same result, keep it
        w = 1.0 if a <= 1e-9 * s else float(np.clip((s - d) / a, 0.0, 1.0))
        return {"weight": w, "voxels": n,
                "mse_input": s / n,                                   # SURE of the input itself
                "mse_network": (a - s + 2.0 * d) / n,                 # SURE(1)
                "mse_result": (w * w * a + 2.0 * w * (d - s) + s) / n,  # SURE(w)
                "divergence": d / max(s, 1e-30)}


def blend_weight(noisy: np.ndarray, denoised: np.ndarray, perturbed: np.ndarray, b: np.ndarray,
                 eps: np.ndarray, var: np.ndarray, mask: np.ndarray) -> Dict[str, Any]:
    """:class:`SureSums` of one block of arrays: the weight and the estimates."""
    return SureSums().add(noisy, denoised, perturbed, b, eps, var, mask).result()


def blend(noisy: np.ndarray, denoised: np.ndarray, weight: float) -> np.ndarray:
    """``weight * denoised + (1 - weight) * noisy`` in place in ``denoised`` (float32); give it
    chunks of a large volume (a temporary of the chunk's size is made)."""
    if weight < 1.0:
        denoised *= np.float32(weight)
        denoised += np.float32(1.0 - weight) * np.asarray(noisy, dtype=np.float32)
    return denoised
