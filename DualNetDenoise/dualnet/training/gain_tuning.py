"""Fine-tuning one gain per convolution filter instead of every weight (GainTuning, Mohan et al.,
NeurIPS 2021).

A pretrained denoiser is close to its optimum; fitted to one scan with a noisy self-supervised
estimate of its error (SURE on a few patches), every weight drifts and the result gets worse. With
each convolution's weight reparametrised as ``W * g`` (one ``g`` per output channel, starting at 1)
and only the ``g`` trained, the network can re-weight its features for the scan (a few thousand
numbers instead of hundreds of thousands) but cannot forget what it learnt. :func:`fold_gains` folds
the gains back into the weights, so the fine-tuned model has the base's architecture and file format.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ChannelGain(nn.Module):
    """``W * g`` with one gain per output channel (axis ``axis`` of the weight), ``g`` = 1 at first."""

    def __init__(self, channels: int, axis: int, ndim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))
        self.shape = [1] * ndim
        self.shape[axis] = channels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gain.view(self.shape).to(weight.dtype)


def add_gains(model: nn.Module) -> int:
    """Freeze every parameter of ``model`` and give each convolution a trainable gain per output
    channel (in place). Returns the number of gains."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for module in list(model.modules()):
        if isinstance(module, _CONV + _CONV_T) and not parametrize.is_parametrized(module, "weight"):
            axis = 1 if isinstance(module, _CONV_T) else 0  # output channels
            w = module.weight
            parametrize.register_parametrization(module, "weight", ChannelGain(w.shape[axis], axis, w.dim()))
            n += w.shape[axis]
    if n == 0:
        raise ValueError("the model has no convolution to tune gains of")
    return n


def has_gains(model: nn.Module) -> bool:
    """Whether :func:`add_gains` was applied to ``model``."""
    return any(parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], ChannelGain)
               for m in model.modules() if isinstance(m, _CONV + _CONV_T))


def fold_gains(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the gains multiplied into the weights and the reparametrisation
    removed: the base architecture, trainable as usual."""
    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, _CONV + _CONV_T) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in out.parameters():
        p.requires_grad_(True)
    return out
