"""Losses that belong with the model definitions (research-only SR head)."""

from __future__ import annotations

import torch


def _grads(x: torch.Tensor) -> list:
    """Forward differences along every spatial axis of (N, C, *S)."""
    return [torch.diff(x, dim=d) for d in range(2, x.dim())]


def edge_aware_sr_loss(pred: torch.Tensor, target: torch.Tensor, *,
                       edge_weight: float = 0.5) -> torch.Tensor:
    """L1 on intensities + ``edge_weight`` * L1 on finite-difference gradients.

    ``pred`` and ``target`` are (N, C, [D,] H, W) in normalised units; returns a scalar.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
    loss = (pred - target).abs().mean()
    edge = sum((gp - gt).abs().mean() for gp, gt in zip(_grads(pred), _grads(target)))
    return loss + edge_weight * edge / (pred.dim() - 2)
