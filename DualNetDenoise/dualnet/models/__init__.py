"""Networks: DUAL-NET (2D/3D), DnCNN and Noise2Void-UNet baselines, helpers.

All models take (N, C, [D,] H, W) normalised tensors and return a dict with the keys
``out``, ``sigma``, ``alpha``, ``blind`` (``None`` where a model has no such output) and ``sr``
for DUAL-NET built with ``sr=True``. Every model carries ``model.config`` (the architecture
dict that :mod:`dualnet.modelfile` stores in the model card).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from .baselines import DNCNN_PRESETS, DnCNN, PlainUNet
from .dualnet import PRESETS, DualNet, preset_config
from .layers import voxel_shuffle
from .losses import edge_aware_sr_loss

BASELINES = ("dncnn", "n2v")
KINDS = ("dualnet",) + BASELINES

__all__ = ["build_model", "build_baseline", "build_from_config", "count_parameters",
           "enable_mc_dropout", "edge_aware_sr_loss", "voxel_shuffle", "preset_config", "PRESETS",
           "DNCNN_PRESETS", "KINDS", "DualNet", "DnCNN", "PlainUNet"]


def build_model(preset: str = "tiny", dim: int = 2, *, in_channels: int = 1, sr: bool = False,
                use_neb: bool = True, use_nonlocal: bool = True, dropout: float = 0.1,
                context: int = 1, noise_map: bool = False, dropout_mode: str = "element",
                confidence_head: str = "gate", blocks: Optional[Sequence[int]] = None) -> nn.Module:
    """Build DUAL-NET.

    Args:
        preset: ``"tiny"`` (~0.1-0.3 M parameters, CPU), ``"small"`` (~1-3 M), ``"base"``.
        dim: 2 (slice-wise, input (N, C, H, W)) or 3 (input (N, C, D, H, W)).
        in_channels: image channels (1 for grey-level scans).
        sr: add the x2 super-resolution head (research only).
        use_neb / use_nonlocal: ablation switches (noise branch / bottleneck window attention).
        dropout: dropout probability in the SRB decoder (used for MC-dropout uncertainty).
        context: adjacent slices fed as channels (2.5D; odd, 2D models only).
        noise_map: one more input channel with the physics noise std map (normalised units).
        dropout_mode: ``"element"`` (voxel-wise) or ``"channel"`` (whole feature maps, cheaper).
        confidence_head: NEB confidence map, ``"gate"`` (the skip gates' own map, v6 models) or
            ``"sigma_mlp"`` (a separate head of the features and the log noise std; gates unchanged).
        blocks: residual dense blocks per scale of the restoration branch, full resolution first
            and the bottleneck last (``levels + 1`` ints; None = the preset's).
    """
    return DualNet(preset, dim, in_channels=in_channels, sr=sr, use_neb=use_neb,
                   use_nonlocal=use_nonlocal, dropout=dropout, context=context,
                   noise_map=noise_map, dropout_mode=dropout_mode, confidence_head=confidence_head,
                   blocks=blocks)


def build_baseline(kind: str, dim: int, preset: str = "tiny", *, in_channels: int = 1
                   ) -> nn.Module:
    """Build a baseline network: ``"dncnn"`` or ``"n2v"`` (plain UNet trained with masking)."""
    if kind == "dncnn":
        return DnCNN(dim, preset, in_channels)
    if kind == "n2v":
        return PlainUNet(dim, preset, in_channels)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")


def build_from_config(config: dict) -> nn.Module:
    """Build any model from its ``model.config`` / model-card ``architecture`` dict.

    Raises ``ValueError``/``KeyError``/``TypeError`` on an invalid dict.
    """
    kind = config["kind"]
    dim = int(config["dim"])
    in_channels = int(config.get("in_channels", 1))
    if kind == "dualnet":
        return build_model(config["preset"], dim, in_channels=in_channels,
                           sr=bool(config.get("sr", False)),
                           use_neb=bool(config.get("use_neb", True)),
                           use_nonlocal=bool(config.get("use_nonlocal", True)),
                           dropout=float(config.get("dropout", 0.1)),
                           context=int(config.get("context", 1)),
                           noise_map=bool(config.get("noise_map", False)),
                           dropout_mode=str(config.get("dropout_mode", "element")),
                           confidence_head=str(config.get("confidence_head", "gate")),
                           blocks=config.get("blocks"))
    return build_baseline(kind, dim, config.get("preset", "tiny"), in_channels=in_channels)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``; works on ``meta``-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def enable_mc_dropout(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with only its dropout layers active (Monte Carlo dropout)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            m.train()
    return model
