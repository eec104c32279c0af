"""Baseline networks with the same forward contract as DUAL-NET.

- :class:`DnCNN`: residual denoiser (Zhang et al. 2017), plain conv + ReLU (no batch norm, so
  results do not depend on batch or tile statistics). Returns ``out``; ``sigma``, ``alpha``,
  ``blind`` are ``None``.
- :class:`PlainUNet` (``"n2v"``): a standard small UNet without any blind-spot architecture;
  Noise2Void blind-spot behaviour comes from masking during training. ``blind`` is ``out``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from .dualnet import preset_config
from .layers import conv, conv_nd, conv_transpose_nd, crop_to, pad_to_multiple

DNCNN_PRESETS = {"tiny": (6, 16), "small": (12, 48), "base": (17, 64)}  # (depth, width)


class DnCNN(nn.Module):
    """DnCNN: ``depth`` 3x3 convs, predicts the noise; ``out = x - noise``."""

    def __init__(self, dim: int, preset: str = "tiny", in_channels: int = 1) -> None:
        super().__init__()
        if preset not in DNCNN_PRESETS:
            raise ValueError(f"unknown preset {preset!r}")
        depth, width = DNCNN_PRESETS[preset]
        self.config = dict(kind="dncnn", preset=preset, dim=dim, in_channels=in_channels,
                           sr=False, use_neb=False, use_nonlocal=False, dropout=0.0)
        layers = [conv(dim, in_channels, width), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [conv(dim, width, width), nn.ReLU(inplace=True)]
        layers.append(conv(dim, width, in_channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        return {"out": x - self.body(x), "sigma": None, "alpha": None, "blind": None}


class PlainUNet(nn.Module):
    """Standard UNet (two 3x3 convs per scale), used as the Noise2Void network."""

    def __init__(self, dim: int, preset: str = "tiny", in_channels: int = 1) -> None:
        super().__init__()
        cfg = preset_config(preset)
        self.config = dict(kind="n2v", preset=preset, dim=dim, in_channels=in_channels,
                           sr=False, use_neb=False, use_nonlocal=False, dropout=0.0)
        self.levels = cfg["levels"]
        w = [min(cfg["width"] * 2 ** i, cfg["max_width"]) for i in range(self.levels + 1)]

        def double(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(conv(dim, cin, cout), nn.LeakyReLU(0.1),
                                 conv(dim, cout, cout), nn.LeakyReLU(0.1))

        self.enc = nn.ModuleList([double(in_channels, w[0])] +
                                 [double(w[i], w[i + 1]) for i in range(self.levels)])
        self.down = nn.ModuleList(conv_nd(dim)(w[i], w[i], 2, stride=2) for i in range(self.levels))
        self.up = nn.ModuleList(conv_transpose_nd(dim)(w[i + 1], w[i], 2, stride=2)
                                for i in range(self.levels))
        self.dec = nn.ModuleList(double(2 * w[i], w[i]) for i in range(self.levels))
        self.head = conv(dim, w[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        xp, sizes = pad_to_multiple(x, 2 ** self.levels)
        h = self.enc[0](xp)
        skips = []
        for i in range(self.levels):
            skips.append(h)
            h = self.enc[i + 1](self.down[i](h))
        for i in reversed(range(self.levels)):
            h = self.dec[i](torch.cat([self.up[i](h), skips[i]], 1))
        out = crop_to(self.head(h), sizes)
        return {"out": out, "blind": out, "sigma": None, "alpha": None}
