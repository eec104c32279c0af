"""Smoothing of the three-view mean, guided by how much the views disagree.

Where a 2.5D model runs along z, y and x (:mod:`dualnet.orthoviews`), the mean of the three views
still holds some of the network's error; the views' disagreement says where, and how much. Each
voxel of the mean becomes a weighted mean of itself and its 26 neighbours, each neighbour weighted by
how alike the two 3x3x3 patches of the mean around them are (a non-local-means weight with a search
window of one voxel, computed on the denoised mean, not on the noisy input)::

    w(x, x+o) = exp(-d_o(x) / t(x)^2),   d_o(x) = mean over the patch of (m(x+u) - m(x+o+u))^2
    t(x)^2 = strength^2 * (the views' variance at x, averaged over a 5x5x5 box)

so the smoothing is strongest where the views disagree and stops at edges that the views agree on.
``strength`` is a model card's ``view_smoothing.strength``: for the shipped MRI model it was chosen on
training volumes at four noise levels (docs/design_sweep.md, session 21). Pure NumPy/SciPy (no
PyTorch: ``dualnet denoise`` runs its graphs without it). Arrays are (z, y, x) float32.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Tuple

import numpy as np
from scipy.ndimage import uniform_filter

from .device import cpu_threads
from .errors import ModelError

#: the box (voxels per side) over which the views' variance is averaged into the threshold
SPREAD_BOX = 5
#: the patch (voxels per side) compared between a voxel and its neighbour
PATCH = 3
#: slices of context a piece needs each side: one for the neighbour and one for its patch; the
#: spread's box reaches two as well
HALO = 2
#: most slices per piece (:func:`smooth_views`): bounds the working memory, and is faster than one
#: whole volume here (128^3 on one thread: 0.38 s against 0.67 s; the pieces stay in the cache)
PIECE = 32
#: the neighbours: one voxel in every direction (26), each pair of opposite offsets computed once
HALF_OFFSETS = [o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0)]


def card_strength(card: Optional[Dict[str, Any]]) -> Optional[float]:
    """The card's ``view_smoothing.strength`` (a positive number), or None when the card has none.
    ``ModelError`` for a malformed entry (model cards are untrusted input)."""
    entry = (card or {}).get("view_smoothing")
    if entry is None:
        return None
    value = entry.get("strength") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 100:
        raise ModelError(f"model card: view_smoothing.strength must be a number in (0, 100], got {value!r}")
    return float(value)


def smooth_views(mean: np.ndarray, spread: np.ndarray, strength: float,
                 threads: Optional[int] = None) -> np.ndarray:
    """The three-view ``mean`` (z, y, x) smoothed by patch weights whose threshold is ``strength``
    times the local RMS of ``spread`` (the per-voxel variance of the views about their mean, in the
    squared units of ``mean``); the edge is repeated outside the volume. Returns a new float32
    array; where the views agree exactly (spread 0) a voxel keeps its value unless a neighbour's
    patch is identical to its own. ``ValueError`` for arrays that are not 3D or differ in shape, or
    a strength that is not a positive number.

    The volume is done in pieces of at most :data:`PIECE` slices along z, ``threads`` at once
    (:func:`dualnet.device.cpu_threads`), each with :data:`HALO` slices of context each side: a
    voxel's result depends on the volume within that many voxels, so the result is the same as in
    one piece, and the working memory is a few pieces' worth, not a few volumes'."""
    if mean.ndim != 3 or mean.shape != spread.shape:
        raise ValueError(f"expected two 3D arrays of one shape, got {mean.shape} and {spread.shape}")
    if not np.isfinite(strength) or strength <= 0:
        raise ValueError(f"strength must be a positive number, got {strength!r}")
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(spread, dtype=np.float32)
    nz = m.shape[0]
    workers = cpu_threads(threads)
    pieces = max(workers, -(-nz // PIECE))  # at most PIECE slices each, at least one per thread
    pieces = max(1, min(pieces, nz // (4 * HALO)))  # each at least four halos thick
    workers = min(workers, pieces)
    bounds = np.linspace(0, nz, pieces + 1).round().astype(int)
    out = np.empty_like(m)

    def piece(z0: int, z1: int) -> None:
        lo, hi = max(z0 - HALO, 0), min(z1 + HALO, nz)
        out[z0:z1] = _smooth(m[lo:hi], s[lo:hi], strength)[z0 - lo:z1 - lo]

    if workers == 1:
        for z0, z1 in zip(bounds[:-1], bounds[1:]):
            piece(z0, z1)
    else:  # NumPy and SciPy release the GIL in these loops
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(piece, bounds[:-1], bounds[1:]))
    return out


def _smooth(m: np.ndarray, spread: np.ndarray, strength: float) -> np.ndarray:
    """:func:`smooth_views` on one piece, the edge repeated outside it."""
    t2 = uniform_filter(spread, SPREAD_BOX, mode="nearest")
    # exp(-(patch sum / PATCH^3) / t^2): the patch mean's divisor folded into the threshold
    neg_inv = np.float32(-1) / np.maximum(t2 * np.float32(strength ** 2 * PATCH ** 3), np.float32(1e-30))
    pad = np.pad(m, 3, mode="edge")  # pad[g + 3] = m[g]

    def window(o: Tuple[int, ...], grow: int) -> Tuple[slice, ...]:
        """The slices of ``pad`` that put ``m[g + o]`` at index ``g + grow`` (g on the volume grown
        by ``grow`` voxels each side)."""
        return tuple(slice(3 - grow + k, 3 + grow + k + n) for k, n in zip(o, m.shape))

    num = m.copy()  # the voxel itself: distance 0, weight 1
    den = np.ones_like(m)
    w = np.empty_like(m)
    zero = (0, 0, 0)
    inner = tuple(slice(1, n + 1) for n in m.shape)
    for o in HALF_OFFSETS:
        neg = tuple(-k for k in o)
        # patch sums of (m(g) - m(g + o))^2 for g on the volume grown by one voxel (index g + 1)
        diff = pad[window(zero, 2)] - pad[window(o, 2)]
        dist = _box3(np.square(diff, out=diff))
        # the neighbour g + o is dist[g + 1] away, the neighbour g - o is dist[g - o + 1] away
        shifted = tuple(slice(1 - k, n + 1 - k) for k, n in zip(o, m.shape))
        for d, nb in ((dist[inner], pad[window(o, 0)]), (dist[shifted], pad[window(neg, 0)])):
            np.multiply(d, neg_inv, out=w)
            np.exp(w, out=w)
            den += w
            w *= nb
            num += w
    return num / den


def _box3(x: np.ndarray) -> np.ndarray:
    """Sums over 3x3x3 boxes, only where the box fits (each axis 2 shorter): separable, by shifted
    slices (a tenth of ``scipy.ndimage.uniform_filter``'s time here)."""
    for axis in range(3):
        n = x.shape[axis]
        part = [(slice(None),) * axis + (slice(k, n - 2 + k),) for k in range(3)]
        x = x[part[0]] + x[part[1]] + x[part[2]]
    return x
