"""DUAL-NET: a blind-spot noise-estimation branch (NEB) + a structure-restoration branch (SRB).

Input ``x`` is (N, C, H, W) (``dim=2``) or (N, C, D, H, W) (``dim=3``), intensity-normalised
(roughly zero mean, unit scale). With ``context = K > 1`` (2.5D, ``dim=2`` only) the first ``K``
channels are ``K`` adjacent slices (z - K//2 .. z + K//2) and the output is the middle one.
With ``noise_map=True`` one more channel follows: the per-voxel noise standard deviation that the
modality's physics model gives (:func:`dualnet.training.data.variance_map`, normalised units);
the NEB then refines that grounded estimate (``log sigma = log map + bounded correction``)
instead of guessing it. ``forward`` returns a dict:

- ``out``   (N, 1, *S) denoised image, same spatial size as ``x`` (any size, odd included),
- ``sigma`` (N, 1, *S) per-voxel noise standard deviation in normalised units (> 0, softplus),
- ``alpha`` (N, 1, *S) per-voxel confidence of the blind estimate in [0, 1] (sigmoid),
- ``blind`` (N, 1, *S) blind-spot estimate: voxel ``v`` never depends on input voxel ``v``,
- ``gate``  (N, 1, *S) the skip gates' map of the NEB (the confidence map too when
  ``confidence_head = "gate"``),
- ``sr``    (N, 1, *(2S)) x2 super-resolved output, only when built with ``sr=True``
  (research only: not validated for clinical-looking output).

With ``use_neb=False`` the values of ``sigma``, ``alpha`` and ``blind`` are ``None`` (no ``gate``).
:meth:`DualNet.restore` runs the restoration branch alone on NEB maps given as extra channels.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..presets import NEB_MAPS, PRESETS, input_channels, preset_config, scale_blocks  # noqa: F401 (PRESETS re-exported)
from .layers import (CausalConv, CausalSpatialAttention, NoiseModulatedAttention,
                     ResidualDenseBlock, SqueezeExcite, WindowAttention, avg_pool_nd, conv,
                     conv_nd, conv_transpose_nd, crop_to, pad_to_multiple, shift_down,
                     voxel_shuffle)

#: The NEB's refinement of a physics noise map is bounded to this factor either way.
SIGMA_REFINE_MAX = 2.0
#: Forms of the NEB confidence map (``confidence_head``): the skip gate's own map, or a separate head.
CONFIDENCE_HEADS = ("gate", "sigma_mlp")


class BlindSpotBranch(nn.Module):
    """Shared causal ('upward-looking') conv stack applied to 2*dim reoriented copies.

    Each copy is a transpose/flip of the input so that a different half-space is 'up'. After
    the stack, a one-voxel shift makes each copy's receptive field a strict half-space, and the
    union of the 2*dim strict half-spaces is everything but the centre voxel (Laine et al.
    2019). The copies are re-oriented back and fused with 1x1 convs only, so the property holds
    exactly, at training and at inference. Zero padding inside keeps borders blind too.
    """

    def __init__(self, dim: int, cin: int, width: int, depth: int) -> None:
        super().__init__()
        self.dim = dim
        layers: List[nn.Module] = [CausalConv(dim, cin, width, 3), nn.LeakyReLU(0.2)]
        for i in range(depth - 1):
            layers += [CausalConv(dim, width, width, 3, dilation=2 ** ((i + 1) % 4)),
                       nn.LeakyReLU(0.2)]
        self.stack = nn.Sequential(*layers)
        self.attn = CausalSpatialAttention(dim)
        copies = 2 * dim
        self.fuse = nn.Sequential(conv(dim, copies * width, 2 * width, 1), nn.LeakyReLU(0.2),
                                  conv(dim, 2 * width, width, 1), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for axis in range(2, 2 + self.dim):
            t = x.transpose(2, axis) if axis != 2 else x
            both = torch.cat([t, t.flip(2)], 0)  # 'down' and 'up' share one batch
            y = shift_down(self.attn(self.stack(both)))
            n = x.shape[0]
            y_down, y_up = y[:n], y[n:].flip(2)
            for yy in (y_down, y_up):
                outs.append(yy.transpose(2, axis) if axis != 2 else yy)
        return self.fuse(torch.cat(outs, 1))


class NoiseEstimationBranch(nn.Module):
    """NEB: blind-spot features -> sigma (softplus), noise-modulated attention, blind, alpha."""

    def __init__(self, dim: int, cin: int, width: int, depth: int, cout: Optional[int] = None,
                 prior: bool = False, confidence_head: str = "gate") -> None:
        super().__init__()
        if confidence_head not in CONFIDENCE_HEADS:
            raise ValueError(f"confidence_head must be one of {CONFIDENCE_HEADS}, got {confidence_head!r}")
        self.features = BlindSpotBranch(dim, cin, width, depth)
        self.prior = prior
        self.sigma_head = conv(dim, width + (1 if prior else 0), 1, 1)
        self.attn = NoiseModulatedAttention(dim, width)
        self.blind_head = conv(dim, width, cin if cout is None else cout, 1)
        # the gate map of the restoration branch's skips (1x1 conv of the features); "gate": it is also
        # the reported confidence map; "sigma_mlp": a separate head (two 1x1 convs of [features,
        # log sigma]: how far the blind-spot estimate is off, in noise stds, depends on the level
        # itself) predicts the confidence, and the gate, hence the denoised output, is unchanged
        self.alpha_head = conv(dim, width, 1, 1)
        self.confidence_head = (nn.Sequential(conv(dim, width + 1, width, 1), nn.LeakyReLU(0.2),
                                              conv(dim, width, 1, 1))
                                if confidence_head == "sigma_mlp" else None)
        #: training only: the confidence head is trained by its own loss alone: it reads the features
        #: detached, and the restoration branch's gates read its output detached (DualNet.forward), so
        #: neither the denoising loss shapes the map nor the map's loss the features. Inference is
        #: unchanged; not part of the file format.
        self.detach_alpha_features = False

    def forward(self, x: torch.Tensor, noise_map: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        if self.prior and noise_map is not None:
            log_prior = torch.log(noise_map.clamp_min(1e-4))
            corr = torch.tanh(self.sigma_head(torch.cat([f, log_prior], 1)))
            sigma = torch.exp(log_prior + math.log(SIGMA_REFINE_MAX) * corr)
        else:
            sigma = F.softplus(self.sigma_head(f)) + 1e-4
        log_sigma = torch.log(sigma)
        f = self.attn(f, log_sigma)
        if self.confidence_head is None:
            gate = torch.sigmoid(self.alpha_head(f.detach() if self.detach_alpha_features else f))
            alpha = gate
            if self.detach_alpha_features:  # the gates read it detached (DualNet.forward docstring)
                gate = gate.detach()
        else:
            gate = torch.sigmoid(self.alpha_head(f))
            fc = torch.cat([f, log_sigma], 1)
            alpha = torch.sigmoid(self.confidence_head(fc.detach() if self.detach_alpha_features else fc))
        return {"blind": self.blind_head(f), "sigma": sigma, "alpha": alpha, "gate": gate}


class GuidedSkipGate(nn.Module):
    """Cross-attention gate on a skip connection.

    ``skip * sigmoid(Ws skip + Wd up + Wg [alpha, log sigma])``: the decoder signal and the
    NEB reliability maps decide which encoder features pass (unreliable ones are suppressed).
    """

    def __init__(self, dim: int, channels: int, guide_channels: int) -> None:
        super().__init__()
        self.ws = conv(dim, channels, channels, 1)
        self.wd = conv(dim, channels, channels, 1, bias=False)
        self.wg = conv(dim, guide_channels, channels, 1, bias=False) if guide_channels else None

    def forward(self, skip: torch.Tensor, up: torch.Tensor,
                guide: Optional[torch.Tensor]) -> torch.Tensor:
        g = self.ws(skip) + self.wd(up)
        if self.wg is not None and guide is not None:
            g = g + self.wg(guide)
        return skip * torch.sigmoid(g)


class StructureRestorationBranch(nn.Module):
    """SRB: residual UNet with RDBs per scale, SE + windowed MHSA bottleneck, gated skips."""

    def __init__(self, dim: int, cin: int, cfg: dict, *, guide_channels: int,
                 use_nonlocal: bool, dropout: float, dropout_mode: str = "element") -> None:
        super().__init__()
        self.dim, self.levels = dim, cfg["levels"]
        layers, growth = cfg["rdb"]
        widths = [min(cfg["width"] * 2 ** i, cfg["max_width"]) for i in range(self.levels + 1)]
        self.widths = widths
        self.inc = conv(dim, cin, widths[0], 3)

        per_scale = scale_blocks(cfg["blocks"], self.levels)

        def blocks(scale: int) -> nn.Module:
            return nn.Sequential(*[ResidualDenseBlock(dim, widths[scale], growth, layers)
                                   for _ in range(per_scale[scale])])

        self.enc = nn.ModuleList(blocks(i) for i in range(self.levels))
        self.down = nn.ModuleList(conv_nd(dim)(widths[i], widths[i + 1], 2, stride=2)
                                  for i in range(self.levels))
        wb = widths[-1]
        self.bottleneck = blocks(self.levels)
        self.se = SqueezeExcite(dim, wb)
        self.nonlocal_attn = (WindowAttention(dim, wb, cfg["heads"], 4, dropout)
                              if use_nonlocal else None)
        self.up = nn.ModuleList(conv_transpose_nd(dim)(widths[i + 1], widths[i], 2, stride=2)
                                for i in range(self.levels))
        self.gates = nn.ModuleList(GuidedSkipGate(dim, widths[i], guide_channels)
                                   for i in range(self.levels))
        self.merge = nn.ModuleList(conv(dim, 2 * widths[i], widths[i], 1)
                                   for i in range(self.levels))
        self.dec = nn.ModuleList(blocks(i) for i in range(self.levels))
        # "channel": whole feature maps are dropped (Dropout2d/3d): N*C random numbers per layer
        # instead of N*C*H*W, measured ~15 % faster training steps on the 2-core CPU
        self.drop = (nn.Dropout(dropout) if dropout_mode == "element" else
                     (nn.Dropout2d(dropout) if dim == 2 else nn.Dropout3d(dropout)))
        self.act = nn.LeakyReLU(0.2)
        self.noise_head = conv(dim, widths[0], 1, 3)

    @property
    def stride(self) -> int:
        """Spatial sizes must be a multiple of this (the caller pads)."""
        return 2 ** self.levels

    def forward(self, x: torch.Tensor, guide: Optional[torch.Tensor]
                ) -> Dict[str, torch.Tensor]:
        h = self.act(self.inc(x))
        skips = []
        for enc, down in zip(self.enc, self.down):
            h = enc(h)
            skips.append(h)
            h = self.act(down(h))
        h = self.se(self.bottleneck(h))
        if self.nonlocal_attn is not None:
            h = self.nonlocal_attn(h)
        h = self.drop(h)
        for i in reversed(range(self.levels)):
            h = self.act(self.up[i](h))
            g = avg_pool_nd(guide, 2 ** i) if (guide is not None and i) else guide
            skip = self.gates[i](skips[i], h, g)
            h = self.drop(self.dec[i](self.act(self.merge[i](torch.cat([h, skip], 1)))))
        return {"noise": self.noise_head(h), "features": h}


class SRHead(nn.Module):
    """x2 super-resolution head (research only): conv -> pixel/voxel shuffle -> conv.

    Adds a learned correction to a linearly upsampled denoised image.
    """

    def __init__(self, dim: int, width: int, cout: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.expand = conv(dim, width, width * 2 ** dim, 3)
        self.refine = nn.Sequential(nn.LeakyReLU(0.2), conv(dim, width, width, 3),
                                    nn.LeakyReLU(0.2), conv(dim, width, cout, 3))

    def forward(self, features: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if self.dim == 2 else "trilinear"
        base = F.interpolate(out, scale_factor=2, mode=mode, align_corners=False)
        return base + self.refine(voxel_shuffle(self.expand(features), 2))


class DualNet(nn.Module):
    """DUAL-NET denoiser (see module docstring for the forward contract)."""

    def __init__(self, preset: str = "tiny", dim: int = 2, *, in_channels: int = 1,
                 sr: bool = False, use_neb: bool = True, use_nonlocal: bool = True,
                 dropout: float = 0.1, context: int = 1, noise_map: bool = False,
                 dropout_mode: str = "element", confidence_head: str = "gate",
                 blocks: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        conv_nd(dim)  # validates dim
        cfg = preset_config(preset)
        if blocks is not None:  # RDBs per scale instead of the preset's
            cfg["blocks"] = scale_blocks(blocks, cfg["levels"])
        context = int(context)
        if context < 1 or context % 2 == 0 or (dim == 3 and context != 1):
            raise ValueError(f"context must be an odd number of slices >= 1 (2D models only), got {context}")
        if dropout_mode not in ("element", "channel"):
            raise ValueError(f"dropout_mode must be 'element' or 'channel', got {dropout_mode!r}")
        if (context > 1 or noise_map) and (in_channels != 1 or sr):
            raise ValueError("context / noise_map need in_channels = 1 and no SR head")
        self.dim, self.in_channels = dim, in_channels
        self.context, self.noise_map = context, bool(noise_map)
        self.config = dict(kind="dualnet", preset=preset, dim=dim, in_channels=in_channels,
                           sr=bool(sr), use_neb=bool(use_neb), use_nonlocal=bool(use_nonlocal),
                           dropout=float(dropout), context=context, noise_map=bool(noise_map),
                           dropout_mode=dropout_mode)
        if use_neb and confidence_head != "gate":  # recorded only when it differs from the v6 form
            self.config["confidence_head"] = confidence_head
        if blocks is not None:  # recorded only when it differs from the preset
            self.config["blocks"] = list(cfg["blocks"])
        nw, nd = cfg["neb"]
        img_ch = in_channels * context
        self.neb = (NoiseEstimationBranch(dim, img_ch, nw, nd, cout=in_channels, prior=self.noise_map,
                                          confidence_head=confidence_head) if use_neb else None)
        # SRB input: the slices, [the noise map], [blind estimate, log sigma]
        srb_in = img_ch + (1 if self.noise_map else 0) + (in_channels + 1 if use_neb else 0)
        self.srb = StructureRestorationBranch(dim, srb_in, cfg, guide_channels=2 if use_neb else 0,
                                              use_nonlocal=use_nonlocal, dropout=dropout,
                                              dropout_mode=dropout_mode)
        self.sr_head = SRHead(dim, self.srb.widths[0], in_channels) if sr else None

    @property
    def input_channels(self) -> int:
        """Channels ``forward`` expects: ``context`` slices (+ 1 noise map)."""
        return input_channels(self.config)

    #: maps of the NEB the restoration branch reads (:meth:`restore` takes them as extra channels)
    NEB_MAPS = NEB_MAPS

    def full_precision_modules(self) -> Dict[str, nn.Module]:
        """The layers that stay in fp32 under CPU bf16 inference (:mod:`dualnet.precision`): those
        reading or writing image intensities, whose bf16 rounding (8-bit mantissa: about 4 HU at
        soft tissue on a CT normalised by its range) is as large as the low-dose noise. They are the
        restoration branch's input convolution and first full-resolution block, and the noise branch's
        input convolution and blind-spot head. On the CT validation cases at 25 % dose all-bf16 cost
        0.06 dB, these four kept in fp32 0.000 dB (docs/design_sweep.md, session 19)."""
        names = ["srb.inc", "srb.enc.0"]
        if self.neb is not None:
            names += ["neb.features.stack.0.conv", "neb.blind_head"]
        return {n: self.get_submodule(n) for n in names}

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        self._check_input(x, self.input_channels)
        result: Dict[str, Optional[torch.Tensor]] = {"sigma": None, "alpha": None, "blind": None}
        img_ch = self.in_channels * self.context
        if self.neb is None:
            result.update(self._restore(x, None))
            return result
        nmap = x[:, img_ch:img_ch + 1] if self.noise_map else None
        neb = self.neb(x[:, :img_ch], nmap)  # unpadded: padding would put copies of border voxels in view
        result.update(neb)  # blind, sigma, alpha, gate (the skip gates' map)
        result.update(self._restore(x, (neb["blind"], torch.log(neb["sigma"]), neb["gate"])))
        return result

    def restore(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """The restoration branch alone, on NEB maps computed before (for instance along another
        axis of the same volume): ``x`` = the usual input channels, then :data:`NEB_MAPS`
        (blind estimate, log sigma, gate map; normalised units). Returns ``{"out": ...}`` (no SR)."""
        if self.neb is None or self.sr_head is not None:
            raise ValueError("restore() needs a model with an NEB and without the SR head")
        n = self.input_channels
        self._check_input(x, n + len(self.NEB_MAPS))
        maps = (x[:, n:n + 1], x[:, n + 1:n + 2], x[:, n + 2:n + 3])
        return {"out": self._restore(x[:, :n], maps)["out"]}

    def _check_input(self, x: torch.Tensor, channels: int) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected a {self.dim + 2}-D tensor (N, C, *spatial), got {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"expected {channels} input channels, got {x.shape[1]}")

    def _restore(self, x: torch.Tensor, maps: Optional[tuple]) -> Dict[str, torch.Tensor]:
        """SRB on the input channels and the NEB's (blind, log sigma, gate) maps (None: no NEB)."""
        mid = (self.context // 2) * self.in_channels
        centre = x[:, mid:mid + self.in_channels]
        guide = None
        srb_in = x
        if maps is not None:
            blind, log_sigma, gate = maps
            guide = torch.cat([gate, log_sigma], 1)
            srb_in = torch.cat([x, blind, log_sigma], 1)
        padded, sizes = pad_to_multiple(srb_in, self.srb.stride)
        if guide is not None:
            guide, _ = pad_to_multiple(guide, self.srb.stride)
        srb = self.srb(padded, guide)
        result = {"out": centre - crop_to(srb["noise"], sizes)}
        if self.sr_head is not None:
            result["sr"] = self.sr_head(crop_to(srb["features"], sizes), result["out"])
        return result


#: The architecture keys a transplant may change (``transplant_weights``): the ablation switches,
#: the form of the confidence head, the number of adjacent slices (widened only) and the residual
#: dense blocks per scale (added only).
TRANSPLANT_SWITCHES = ("use_neb", "use_nonlocal", "confidence_head", "context", "blocks")
#: The input convolutions whose input channels start with the slices (``transplant_weights``).
_SLICE_INPUT_CONVS = ("srb.inc.weight", "neb.features.stack.0.conv.weight")


def _widen_input(old: torch.Tensor, new: torch.Tensor, k_old: int, k_new: int) -> torch.Tensor:
    """``old``'s input channels placed where they sit in a model with ``k_new`` slices.

    Slice ``j`` of ``k_old`` becomes slice ``j + (k_new - k_old) // 2`` (the centre stays the centre);
    the channels after the slices (noise map, NEB outputs) move up by ``k_new - k_old``. The new
    slices' weights are zero, so the widened model computes exactly what ``old`` did until it learns.
    """
    out = torch.zeros_like(new)
    off = (k_new - k_old) // 2
    out[:, off:off + k_old] = old[:, :k_old]
    out[:, k_new:] = old[:, k_old:k_old + out.shape[1] - k_new]
    return out


def _blocks_of(net: DualNet) -> List[int]:
    """Residual dense blocks per scale of ``net``'s restoration branch (full resolution first)."""
    return [len(b) for b in net.srb.enc] + [len(net.srb.bottleneck)]


def transplant_weights(src: DualNet, dst: DualNet) -> Dict[str, List[str]]:
    """Copy ``src``'s weights into ``dst``, which differs from it at most in ``TRANSPLANT_SWITCHES``.

    For a final-budget ablation, a variant without the NEB (or with / without the bottleneck
    attention) starts from the trained full model instead of from scratch; a separate confidence
    head (``confidence_head``) is trained on a trained model; a model with more adjacent slices
    (``context``, widened only) starts as the trained one, its new slices weighted zero; so does one
    with more residual dense blocks at some scales (``blocks``, added only): an added block's 1x1
    fusion starts at zero, so the block is the identity until it learns. Weights with
    the same name and shape are copied; the SRB input convolution keeps the weights of the input
    channels both models share (the slices and the noise map come first in both); the rest of
    ``dst`` keeps its initialisation. Returns the names ``copied``, ``partial`` (input convs),
    ``dropped`` (only in ``src``) and ``new`` (only in ``dst``). ``ValueError`` when anything else
    differs.
    """
    a = {k: v for k, v in src.config.items() if k not in TRANSPLANT_SWITCHES}
    b = {k: v for k, v in dst.config.items() if k not in TRANSPLANT_SWITCHES}
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"the models differ in more than the switches {TRANSPLANT_SWITCHES}: {diff}")
    k_old, k_new = src.context, dst.context
    if k_new < k_old:
        raise ValueError(f"a transplant may widen the context, not narrow it ({k_old} -> {k_new} slices)")
    if k_new != k_old and src.config["use_neb"] != dst.config["use_neb"]:
        raise ValueError("widen the context and switch the NEB in two transplants, not one")
    b_old, b_new = _blocks_of(src), _blocks_of(dst)
    if any(n < o for o, n in zip(b_old, b_new)):
        raise ValueError(f"a transplant may add residual dense blocks, not remove them ({b_old} -> {b_new})")
    have, want = src.state_dict(), dst.state_dict()
    report: Dict[str, List[str]] = {"copied": [], "partial": [], "dropped": [], "new": []}
    merged = {}
    for name, w in want.items():
        v = have.get(name)
        if v is not None and v.shape == w.shape:
            merged[name] = v.clone()
            report["copied"].append(name)
        elif v is not None and k_new != k_old and name in _SLICE_INPUT_CONVS:
            merged[name] = _widen_input(v, w, k_old, k_new)
            report["partial"].append(name)
        elif v is not None and name == "srb.inc.weight" and v.shape[0] == w.shape[0] and v.shape[2:] == w.shape[2:]:
            shared = min(v.shape[1], w.shape[1])
            w = w.clone()
            w[:, :shared] = v[:, :shared]
            merged[name] = w
            report["partial"].append(name)
        elif name.startswith(("srb.enc.", "srb.dec.", "srb.bottleneck.")) and ".fuse." in name:
            merged[name] = torch.zeros_like(w)  # an added block starts as the identity (x + 0)
            report["new"].append(name)
        else:
            merged[name] = w
            report["new"].append(name)
    report["dropped"] = sorted(k for k in have if k not in want)
    dst.load_state_dict(merged)
    return report

