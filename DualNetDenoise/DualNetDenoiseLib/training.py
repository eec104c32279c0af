"""Command lines, configs and progress parsing for the training panel (no Qt, no MRML).

Training runs in a child process through the core's command line, which prints
``DUALNET_PROGRESS {json}`` lines with ``--progress-json``:

* fine-tuning on noisy scans (self-supervised)::

    python -m dualnet finetune IN1 [IN2 ...] --model BASE --out USER/NAME.safetensors
        --run-dir USER/NAME_run --steps N --device D --progress-json [--resume]

* pretraining from clean scans (supervised, synthetic noise): a copy of the shipped
  ``pretrain_<modality>.toml`` with the user's volumes as ``[[data]]`` entries, then::

    python -m dualnet train --config CFG --out USER/NAME_run --export USER/NAME.safetensors
        --steps N --device D --progress-json [--resume]

Events on the progress lines: ``{"event": "step", "step", "steps", "fraction", "loss", "val_loss",
"val_psnr", ...}``, ``{"event": "done", "model": ...}``, ``{"event": "cancelled", ...}``, and after
fine-tuning ``{"event": "check", "message": ...}`` while the fine-tuned model is checked against its base
over whole scans (the last one says which was kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

STAGES = ("finetune", "pretrain")
#: pretraining network: "shipped" continues the shipped model of the modality (its architecture and its
#: config's continuation learning rate); the others are DUAL-NET presets trained from random weights.
PRESETS = ("shipped", "tiny", "small", "base")
#: a from-scratch preset's learning rate (the shipped configs' rates are for continuing a model)
SCRATCH_LR = 1e-3
#: keys of a shipped config that belong to its own run, not to the user's: its starting model (and the
#: transplant options), the cpu preset's blocks per scale, its wall-clock stop, threads and device
_RUN_KEYS = ("init_from", "init_partial", "new_lr_factor", "blocks", "time_budget_s", "threads", "device")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")


def configs_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "dualnet" / "configs"


def folder_volumes(folder) -> List[str]:
    """Volume files (and DICOM series sub-folders) in ``folder``, sorted; [] for no folder."""
    if not folder or str(folder) in ("", "."):
        return []
    f = Path(folder)
    if not f.is_dir():
        raise ValueError(f"{f}: not a folder")
    out = []
    for p in sorted(f.iterdir()):
        if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES) and not p.name.startswith("."):
            out.append(str(p))
        elif p.is_dir() and any(c.suffix.lower() == ".dcm" for c in p.iterdir() if c.is_file()):
            out.append(str(p))
    return out


def model_paths(user_dir, name: str):
    """(model file, run folder) for a model name in the per-user folder (the store's file naming:
    :func:`models.model_file_stem`, which refuses the index's own name)."""
    from .models import model_file_stem

    safe = model_file_stem(name)
    user = Path(user_dir)
    return user / f"{safe}.safetensors", user / f"{safe}_run"


def write_pretrain_config(base_config: Path, data_paths: Sequence[str], out_path: Path,
                          preset: Optional[str] = None, init_model: Optional[Path] = None) -> Path:
    """A pretraining config: ``base_config`` (a shipped ``pretrain_<modality>.toml``) with ``data_paths``
    as its data and its run's own keys (:data:`_RUN_KEYS`) back at their defaults.

    ``preset`` "shipped" (or None) continues ``init_model`` (the shipped model of the modality): its
    card's architecture, the config's learning rate; "tiny" / "small" / "base" train that preset from
    random weights at :data:`SCRATCH_LR`. With two or more volumes the last one is the validation case
    (split per case, never per slice); with one volume the core validates on that same case and says
    so ("val (same case as train)"). The written config is loaded and its network built and
    initialised here, so a config that cannot train fails before a run starts.

    Raises:
        ValueError: no volumes, an unknown preset, "shipped" without ``init_model``, or a config that
            does not load, build or initialise.
    """
    from dualnet.errors import DualNetError
    from dualnet.training.config import DataSource, TrainConfig

    if not data_paths:
        raise ValueError("pretraining needs at least one clean volume")
    preset = preset or "shipped"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if preset == "shipped" and init_model is None:
        raise ValueError("the shipped preset continues the shipped model: init_model is needed")
    paths = [str(Path(p).resolve()) for p in data_paths]
    splits = ["train"] * (len(paths) - 1) + ["val" if len(paths) >= 2 else "train"]
    defaults = TrainConfig()
    changes = {key: getattr(defaults, key) for key in _RUN_KEYS}
    changes["data"] = [DataSource(path=p, split=s) for p, s in zip(paths, splits)]
    try:
        if preset == "shipped":
            changes.update(_architecture_fields(Path(init_model)), init_from=str(Path(init_model).resolve()))
        else:
            changes.update(preset=preset, lr=SCRATCH_LR)
        cfg = TrainConfig.from_toml(base_config).replace(**changes)
    except DualNetError as err:
        raise ValueError(f"cannot write the pretraining config: {err}") from None
    cfg.save(out_path)
    _check_trainable(Path(out_path))
    return Path(out_path)


def _architecture_fields(model: Path) -> dict:
    """The config fields that give a model file's architecture (from its card)."""
    from dualnet.modelfile import read_card

    arch = dict(read_card(model).get("architecture") or {})
    fields = {"model": arch.pop("kind", "dualnet")}
    arch.pop("in_channels", None)  # the input's channels follow from context and noise_map
    fields.update(arch)
    fields.setdefault("blocks", [])
    return fields


def _check_trainable(config: Path) -> None:
    """Load ``config``, build its network and load its ``init_from``, as the training run will."""
    from dualnet.errors import DualNetError
    from dualnet.training.config import load_config
    from dualnet.training.trainer import build_network, load_init_weights

    try:
        cfg = load_config(config)
        net = build_network(cfg)
        if cfg.init_from:
            load_init_weights(net, cfg.init_from, None, cfg.init_partial)
    except (DualNetError, ValueError, TypeError) as err:
        raise ValueError(f"the pretraining config cannot train: {err}") from None


def finetune_command(python: str, inputs: Sequence[str], base_model: str, out_model: Path, run_dir: Path,
                     steps: int, device: str = "auto", resume: bool = False,
                     sigma: Optional[float] = None) -> List[str]:
    """``dualnet finetune`` for the panel; ``sigma``: the scans' noise level as ``dualnet finetune --sigma``
    takes it (MRI the Rician sigma in image units, CT the noise std at water in HU, US the relative
    speckle std), None = estimated from each scan."""
    if not inputs:
        raise ValueError("fine-tuning needs at least one noisy volume (scene volume or folder)")
    cmd = [python, "-m", "dualnet", "finetune", *map(str, inputs), "--model", str(base_model), "--out", str(out_model),
           "--run-dir", str(run_dir), "--steps", str(int(steps)), "--device", device, "--progress-json"]
    if sigma is not None:
        cmd += ["--sigma", repr(float(sigma))]
    return cmd + (["--resume"] if resume else [])


def pretrain_command(python: str, config: Path, run_dir: Path, out_model: Path, steps: int, device: str = "auto",
                     resume: bool = False) -> List[str]:
    cmd = [python, "-m", "dualnet", "train", "--config", str(config), "--out", str(run_dir), "--export", str(out_model),
           "--steps", str(int(steps)), "--device", device, "--progress-json"]
    return cmd + (["--resume"] if resume else [])


@dataclass
class TrainingPoint:
    step: int
    loss: Optional[float]
    val_loss: Optional[float]
    val_psnr: Optional[float]


def point_from_event(payload: dict) -> Optional[TrainingPoint]:
    """A loss-plot point from a ``{"event": "step", ...}`` payload, else None."""
    if payload.get("event") != "step" or payload.get("step") is None:
        return None

    def num(key):
        v = payload.get(key)
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None

    return TrainingPoint(int(payload["step"]), num("loss"), num("val_loss"), num("val_psnr"))


def progress_text(payload: dict) -> str:
    """One status line for a progress payload."""
    ev = payload.get("event")
    if ev == "step":
        parts = [f"step {payload.get('step')}/{payload.get('steps')}"]
        if payload.get("loss") is not None:
            parts.append(f"loss {float(payload['loss']):.4g}")
        if payload.get("val_psnr") is not None:
            parts.append(f"val PSNR {float(payload['val_psnr']):.2f} dB")
        if payload.get("eta_s") is not None:
            parts.append(f"ETA {float(payload['eta_s']) / 60:.1f} min")
        return ", ".join(parts)
    if ev == "done":
        return f"done: model {payload.get('model')}"
    if ev == "cancelled":
        return f"stopped at step {payload.get('step')}; resume to continue"
    return str(payload.get("message", ""))
