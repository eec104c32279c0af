"""Exponential moving average of a network's weights during training (``TrainConfig.ema_decay``).

One noise level per view-loss step, or a small batch, makes the weights after any one step noisy:
the held-out PSNR of successive checkpoints moved by up to 0.7 dB (docs/design_sweep.md, session 22).
The average over the last ~1 / (1 - decay) steps is what validation, ``export_best`` and the
exported model then use; the optimiser keeps stepping the raw weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional


class WeightAverage:
    """The running average of ``model``'s floating-point state (parameters and float buffers).

    ``update(model, step)`` after each optimiser step: ``avg = d avg + (1 - d) w`` with
    ``d = min(decay, (1 + step) / (10 + step))``, so the first steps are not dominated by the
    starting weights. Integer buffers are not averaged (the model's own are used).
    """

    def __init__(self, model: Any, decay: float, state: Optional[Dict[str, Any]] = None) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        own = model.state_dict()
        self.shadow: Dict[str, Any] = {k: v.detach().clone() for k, v in own.items() if v.is_floating_point()}
        if state:
            self.load_state_dict(state)

    def update(self, model: Any, step: int) -> None:
        """Blend the model's current weights into the average (call after ``optimizer.step()``)."""
        import torch

        d = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in self.shadow:
                    self.shadow[k].mul_(d).add_(v.detach().to(self.shadow[k].dtype), alpha=1.0 - d)

    def state_dict(self) -> Dict[str, Any]:
        """A CPU copy of the average (for checkpoints and snapshots)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore an average saved by :meth:`state_dict`; ``ValueError`` if its keys or shapes differ."""
        if set(state) != set(self.shadow):
            raise ValueError("weight average: the saved keys do not match the model's")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise ValueError(f"weight average: {k} has shape {tuple(v.shape)}, the model {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)

    def copy_to(self, model: Any) -> None:
        """Load the average into ``model`` (its integer buffers stay as they are)."""
        model.load_state_dict({**model.state_dict(), **self.shadow})

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """``model`` with the averaged weights inside the block, its own weights restored after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(own)


def maybe_applied(average: Optional[WeightAverage], model: Any):
    """:meth:`WeightAverage.applied`, or a no-op context without an average."""
    return average.applied(model) if average is not None else contextlib.nullcontext(model)
