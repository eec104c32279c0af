"""Dimension-agnostic building blocks of DUAL-NET (2D and 3D share one code path).

Tensors are (N, C, H, W) for ``dim=2`` and (N, C, D, H, W) for ``dim=3``. Every layer here is
either pointwise, a local convolution or a windowed operation, except :class:`SqueezeExcite`,
which pools over the whole (tile) extent.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_nd(dim: int) -> type:
    """``nn.Conv2d`` or ``nn.Conv3d`` for ``dim`` 2 or 3."""
    if dim == 2:
        return nn.Conv2d
    if dim == 3:
        return nn.Conv3d
    raise ValueError(f"dim must be 2 or 3, got {dim}")


def conv_transpose_nd(dim: int) -> type:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d


def avg_pool_nd(x: torch.Tensor, k: int) -> torch.Tensor:
    """Average pooling with kernel = stride = ``k`` over the spatial dims of ``x``."""
    return F.avg_pool2d(x, k) if x.dim() == 4 else F.avg_pool3d(x, k)


def conv(dim: int, cin: int, cout: int, k: int = 3, *, stride: int = 1, dilation: int = 1,
         bias: bool = True) -> nn.Module:
    """A 'same'-padded convolution (zero padding) of kernel ``k`` in ``dim`` dimensions."""
    return conv_nd(dim)(cin, cout, k, stride=stride, padding=dilation * (k // 2) if stride == 1 else 0,
                        dilation=dilation, bias=bias)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate"
                    ) -> Tuple[torch.Tensor, List[int]]:
    """Pad the spatial dims of ``x`` at their end to a multiple of ``multiple``.

    Returns the padded tensor and the original spatial sizes (to crop back with :func:`crop_to`).
    """
    sizes = list(x.shape[2:])
    pads: List[int] = []
    for s in reversed(sizes):  # F.pad takes the last dim first
        pads += [0, (-s) % multiple]
    if any(pads):
        if mode == "replicate" or mode == "reflect":
            # reflect needs pad < size; replicate is always valid
            x = F.pad(x, pads, mode="replicate")
        else:
            x = F.pad(x, pads, mode="constant", value=0.0)
    return x, sizes


def crop_to(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Crop the spatial dims of ``x`` to ``sizes`` (keeping the start)."""
    index = (slice(None), slice(None)) + tuple(slice(0, s) for s in sizes)
    return x[index]


class CausalConv(nn.Module):
    """Convolution whose receptive field along the first spatial axis only looks 'up'.

    Output row ``i`` (along axis 2) sees input rows ``i - (k-1)*dilation .. i``; the other
    spatial axes are centred. Zero padding, so nothing outside the input leaks in.
    """

    def __init__(self, dim: int, cin: int, cout: int, k: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.conv = conv_nd(dim)(cin, cout, k, dilation=dilation, padding=0)
        half = dilation * (k // 2)
        pads: List[int] = []
        for _ in range(dim - 1):  # trailing spatial axes, symmetric
            pads += [half, half]
        pads += [dilation * (k - 1), 0]  # first spatial axis: all before
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pads))


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Shift along the first spatial axis by one (zero in, last row out).

    After this, output row ``i`` only depends on input rows strictly above ``i``.
    """
    pads = [0, 0] * (x.dim() - 3) + [1, 0]
    return F.pad(x, pads)[:, :, :-1]


class CausalSpatialAttention(nn.Module):
    """Spatial attention (CBAM style) computed with a causal conv, so it keeps the blind spot."""

    def __init__(self, dim: int, k: int = 3, dilation: int = 2) -> None:
        super().__init__()
        self.conv = CausalConv(dim, 2, 1, k, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(stats))


class NoiseModulatedAttention(nn.Module):
    """Pointwise channel + spatial attention gated by the estimated noise level.

    Both gates are per-voxel functions of the feature vector and ``log sigma`` at that voxel
    (1x1 convolutions), so the module is blind-spot preserving.
    """

    def __init__(self, dim: int, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(conv(dim, channels + 1, hidden, 1), nn.LeakyReLU(0.2),
                                     conv(dim, hidden, channels, 1))
        self.spatial = conv(dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.channel(torch.cat([x, log_sigma], 1)))
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True), log_sigma], 1)
        return x * torch.sigmoid(self.spatial(stats))


class ResidualDenseBlock(nn.Module):
    """Residual dense block: ``layers`` densely connected 3x3 convs, 1x1 fusion, residual add."""

    def __init__(self, dim: int, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            conv(dim, channels + i * growth, growth, 3) for i in range(layers))
        self.fuse = conv(dim, channels + layers * growth, channels, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for c in self.convs:
            feats.append(self.act(c(torch.cat(feats, 1))))
        return x + self.fuse(torch.cat(feats, 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel gate (global average over the tile)."""

    def __init__(self, dim: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc(x.flatten(2).mean(-1)))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of ``window^dim`` tokens.

    Spatial sizes are zero-padded to a multiple of ``window``; padded tokens are masked out of
    the keys, so they never influence real tokens. Pre-norm transformer block with a learned
    position embedding per window position and an MLP, both residual.
    """

    def __init__(self, dim: int, channels: int, heads: int, window: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.dim, self.window, self.heads = dim, window, heads
        tokens = window ** dim
        self.pos = nn.Parameter(torch.zeros(tokens, channels))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(),
                                 nn.Linear(2 * channels, channels))
        self.drop = nn.Dropout(dropout)

    def _windows(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """(N, C, *S) -> (N * nW, w^dim, C) with S a multiple of the window."""
        n, c = x.shape[:2]
        sizes = list(x.shape[2:])
        w = self.window
        shape = [n, c]
        for s in sizes:
            shape += [s // w, w]
        x = x.view(*shape)
        d = self.dim
        # axes: 0 n, 1 c, then (2+2i) block index, (3+2i) inside window
        blocks = [2 + 2 * i for i in range(d)]
        inner = [3 + 2 * i for i in range(d)]
        x = x.permute(0, *blocks, *inner, 1).reshape(-1, w ** d, c)
        return x, sizes

    def _unwindows(self, t: torch.Tensor, n: int, sizes: List[int]) -> torch.Tensor:
        w, d = self.window, self.dim
        c = t.shape[-1]
        nb = [s // w for s in sizes]
        t = t.view(n, *nb, *([w] * d), c)
        # current axes: 0 n, 1..d blocks, d+1..2d inner, 2d+1 c -> n, c, (b0, i0), (b1, i1), ...
        order = [0, 2 * d + 1]
        for i in range(d):
            order += [1 + i, 1 + d + i]
        return t.permute(*order).reshape(n, c, *sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xp, sizes = pad_to_multiple(x, self.window, mode="constant")
        valid = torch.ones((n, 1) + tuple(sizes), dtype=x.dtype, device=x.device)
        valid, _ = pad_to_multiple(valid, self.window, mode="constant")
        tok, psizes = self._windows(xp)
        mask = self._windows(valid)[0][..., 0] > 0.5  # (B, T) True where a real token
        b, t, c = tok.shape
        h = self.norm1(tok + self.pos)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T) keys
        # a window with no valid token at all cannot occur (padding < window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(b, t, c)
        tok = tok + self.drop(self.proj(y))
        tok = tok + self.drop(self.mlp(self.norm2(tok)))
        out = self._unwindows(tok, n, psizes)
        return crop_to(out, sizes)


def voxel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sub-pixel shuffle for 2D or 3D: (N, C*r^d, *S) -> (N, C, *(S*r)).

    For 2D this equals ``F.pixel_shuffle``; for 3D the channel index is split as
    (c, rd, rh, rw) in that order.
    """
    d = x.dim() - 2
    n, cr = x.shape[:2]
    sizes = list(x.shape[2:])
    c = cr // (r ** d)
    if c * r ** d != cr:
        raise ValueError(f"channels {cr} not divisible by {r}^{d}")
    x = x.view(n, c, *([r] * d), *sizes)
    # axes: 0 n, 1 c, 2..d+1 sub-factors, d+2..2d+1 sizes -> n, c, (s0, r0), (s1, r1), ...
    order = [0, 1]
    for i in range(d):
        order += [d + 2 + i, 2 + i]
    return x.permute(*order).reshape(n, c, *[s * r for s in sizes])
