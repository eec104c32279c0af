"""Architecture presets of DUAL-NET (no PyTorch import: inference sizes its tiles from them).

``PRESETS`` maps a preset name to its hyper-parameters (used by :class:`dualnet.models.dualnet.DualNet`
and re-exported as ``dualnet.models.PRESETS``).
"""

from __future__ import annotations

from typing import Dict

#: Architecture presets. ``width``: SRB channels at full resolution (doubled per level up to
#: ``max_width``); ``levels``: number of x2 downsamplings; ``rdb``: (layers, growth) of each
#: residual dense block, ``blocks``: RDBs per scale; ``neb``: (width, depth) of the blind-spot
#: branch; ``heads``: attention heads at the bottleneck.
PRESETS: Dict[str, dict] = {
    "tiny": dict(width=16, levels=2, max_width=64, rdb=(2, 8), blocks=1, neb=(8, 3), heads=2),
    "small": dict(width=32, levels=3, max_width=128, rdb=(4, 16), blocks=1, neb=(24, 5),
                  heads=4),
    "base": dict(width=64, levels=4, max_width=512, rdb=(4, 52), blocks=2, neb=(64, 8),
                 heads=8),
    # 2-core CPU design (2.5D + noise map): the budget goes to the SRB's full-resolution width,
    # the NEB stays narrow (its 2*dim rotated copies run at full resolution).
    "cpu": dict(width=24, levels=3, max_width=96, rdb=(2, 16), blocks=1, neb=(8, 2), heads=4),
}


def preset_config(preset: str) -> dict:
    """The hyper-parameters of a preset; ``ValueError`` for an unknown name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[preset])
