"""Training: synthetic supervised pretraining, self-supervised fine-tuning, baselines, DDP.

Public API::

    from dualnet.training import TrainConfig, pretrain, finetune
    cfg = TrainConfig.from_toml("dualnet/configs/pretrain_mri.toml")
    result = pretrain(cfg, out_dir="runs/mri")          # -> TrainResult (model_path, val metrics, ...)
    finetune(["scan.nii.gz"], result.model_path, "mri_ft.safetensors")

Heavy imports (torch) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from .config import CONFIG_VERSION, DataSource, TrainConfig, load_config  # noqa: F401


def pretrain(*args, **kwargs):
    """See :func:`dualnet.training.trainer.pretrain`."""
    from .trainer import pretrain as _p

    return _p(*args, **kwargs)


def finetune(*args, **kwargs):
    """See :func:`dualnet.training.trainer.finetune`."""
    from .trainer import finetune as _f

    return _f(*args, **kwargs)


__all__ = ["CONFIG_VERSION", "DataSource", "TrainConfig", "load_config", "pretrain", "finetune"]
