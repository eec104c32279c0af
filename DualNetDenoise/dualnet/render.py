"""Render slices of volumes to PNG figures (README pictures, reports, screenshots).

Arrays are (z, y, x); ``axis`` picks the slicing direction in array order (0 = axial for a
typical LPS volume). Images are shown with the physical aspect ratio when spacing is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .io import atomic_write_bytes


def mid_slice(array: np.ndarray, axis: int = 0, index: Optional[int] = None) -> np.ndarray:
    """A 2D slice through a 3D (z, y, x) array (the middle one by default); 2D arrays pass through."""
    if array.ndim == 2:
        return array
    idx = array.shape[axis] // 2 if index is None else index
    return np.take(array, idx, axis=axis)


def display_window(reference: np.ndarray, percentiles: Tuple[float, float] = (0.5, 99.5)) -> Tuple[float, float]:
    """Grey-level window (low, high) from robust percentiles of the reference image."""
    lo, hi = np.percentile(reference, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def panels_png(
    panels: Sequence[Tuple[str, np.ndarray]],
    path: str | Path,
    *,
    window: Optional[Tuple[float, float]] = None,
    aspect: float = 1.0,
    title: Optional[str] = None,
    diff_panels: Sequence[Tuple[str, np.ndarray]] = (),
    panel_inches: float = 3.2,
) -> Path:
    """Write a row of grey-scale 2D panels (and optional signed difference maps) as one PNG.

    Args:
        panels: (caption, 2D array (y, x)) pairs shown with the same grey window.
        path: output PNG (written atomically).
        window: (low, high) grey levels; from the first panel's percentiles when None.
        aspect: pixel height / width (spacing_y / spacing_x) so anatomy is not stretched.
        diff_panels: (caption, 2D signed array) shown in a second row with a diverging map and
            one colour bar (same scale for every map). With one difference map per panel after
            the first (the reference), the reference spans both rows in the first column, so no
            panel is left empty.
    """
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = window if window is not None else display_window(panels[0][1])
    reference_column = bool(diff_panels) and len(panels) == len(diff_panels) + 1
    rows = 2 if diff_panels else 1
    cols = max(len(panels), len(diff_panels) + (1 if reference_column else 0))
    fig = plt.figure(figsize=(panel_inches * cols + (0.9 if diff_panels else 0), panel_inches * rows + 0.6),
                     layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    top = []
    for i, (caption, img) in enumerate(panels):
        if reference_column and i == 0:
            ax = fig.add_subplot(grid[:, 0])
        else:
            ax = fig.add_subplot(grid[0, i])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
        top.append(ax)
    if diff_panels:
        span = max(float(np.percentile(np.abs(d), 99.5)) for _, d in diff_panels) or 1.0
        first = 1 if reference_column else 0
        bottom, im = [], None
        for j, (caption, img) in enumerate(diff_panels):
            ax = fig.add_subplot(grid[1, first + j])
            im = ax.imshow(img, cmap="RdBu_r", vmin=-span, vmax=span, aspect=aspect, interpolation="nearest")
            ax.set_title(caption, fontsize=9)
            ax.axis("off")
            bottom.append(ax)
        fig.colorbar(im, ax=bottom, shrink=0.85, label="difference (image units)")
    if title:
        fig.suptitle(title, fontsize=10)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
