"""Architecture presets and input layout of DUAL-NET (no PyTorch import: inference sizes its tiles
and runs the ONNX graphs from them).

``PRESETS`` maps a preset name to its hyper-parameters (used by :class:`dualnet.models.dualnet.DualNet`
and re-exported as ``dualnet.models.PRESETS``); :func:`input_channels` and :data:`NEB_MAPS` give the
channels of its forward pass and of its restoration branch alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Union

#: maps of the NEB the restoration branch reads, in this order (``DualNet.restore`` takes them as
#: extra channels after the input channels)
NEB_MAPS = ("blind", "log_sigma", "gate")

#: Architecture presets. ``width``: SRB channels at full resolution (doubled per level up to
#: ``max_width``); ``levels``: number of x2 downsamplings; ``rdb``: (layers, growth) of each
#: residual dense block, ``blocks``: RDBs per scale (one int, or one per scale: :func:`scale_blocks`);
#: ``neb``: (width, depth) of the blind-spot branch; ``heads``: attention heads at the bottleneck.
PRESETS: Dict[str, dict] = {
    "tiny": dict(width=16, levels=2, max_width=64, rdb=(2, 8), blocks=1, neb=(8, 3), heads=2),
    "small": dict(width=32, levels=3, max_width=128, rdb=(4, 16), blocks=1, neb=(24, 5),
                  heads=4),
    "base": dict(width=64, levels=4, max_width=512, rdb=(4, 52), blocks=2, neb=(64, 8),
                 heads=8),
    # 2-core CPU design (2.5D + noise map): the budget goes to the SRB's full-resolution width,
    # the NEB stays narrow (its 2*dim rotated copies run at full resolution).
    "cpu": dict(width=24, levels=3, max_width=96, rdb=(2, 16), blocks=1, neb=(8, 2), heads=4),
    # "cpu" widened to multiples of 32 channels: on a CPU with AMX (bf16 tiles of 32) a training step
    # costs 1.15x "cpu"'s for 2.4x the parameters, but at the same CPU budget (35 and 115 min, CT) it
    # scored lower than "cpu", and it costs 1.6x at inference. No model uses it (docs/design_sweep.md,
    # session 31).
    "cpu_wide": dict(width=32, levels=3, max_width=128, rdb=(2, 32), blocks=1, neb=(8, 2), heads=4),
}


def preset_config(preset: str) -> dict:
    """The hyper-parameters of a preset; ``ValueError`` for an unknown name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[preset])


def scale_blocks(blocks: Union[int, Sequence[int]], levels: int) -> List[int]:
    """Residual dense blocks at each scale of the restoration branch, full resolution first and the
    bottleneck last (``levels + 1`` numbers; the encoder and decoder of a scale have as many each).
    An int means the same number at every scale. ``ValueError`` for anything else."""
    per_scale = [int(blocks)] * (levels + 1) if isinstance(blocks, int) else [int(b) for b in blocks]
    if len(per_scale) != levels + 1 or min(per_scale) < 1:
        raise ValueError(f"blocks must be one int >= 1 or {levels + 1} of them (full resolution first, "
                         f"bottleneck last), got {blocks!r}")
    return per_scale


def input_channels(arch: Mapping[str, Any]) -> int:
    """Channels a DUAL-NET's forward pass expects for its architecture config: ``in_channels`` x
    ``context`` slices, then the noise map if ``noise_map``."""
    return int(arch.get("in_channels", 1)) * int(arch.get("context", 1)) + (1 if arch.get("noise_map") else 0)
