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

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

STAGES = ("finetune", "pretrain")
PRESETS = ("tiny", "small", "base")
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
                          preset: Optional[str] = None) -> Path:
    """A pretraining config: ``base_config`` with its ``[[data]]`` tables replaced by ``data_paths``.

    With two or more volumes the last one is the validation case (split per case, never per
    slice); with one volume it is used for both (the panel warns that validation is then optimistic).
    """
    if not data_paths:
        raise ValueError("pretraining needs at least one clean volume")
    text = Path(base_config).read_text(encoding="utf-8")
    head = re.split(r"^\s*\[\[data\]\]\s*$", text, maxsplit=1, flags=re.M)[0].rstrip() + "\n"
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
        head, n = re.subn(r'^\s*preset\s*=.*$', f'preset = "{preset}"', head, flags=re.M)
        if n == 0:
            head += f'preset = "{preset}"\n'
    paths = [str(Path(p).resolve()) for p in data_paths]
    splits = ["train"] * len(paths)
    if len(paths) >= 2:
        splits[-1] = "val"
    blocks = [f'\n[[data]]\npath = {json.dumps(p)}\nsplit = "{s}"\n' for p, s in zip(paths, splits)]
    if len(paths) == 1:
        blocks.append(f'\n[[data]]\npath = {json.dumps(paths[0])}\nsplit = "val"\n')
    Path(out_path).write_text(head + "".join(blocks), encoding="utf-8")
    return Path(out_path)


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
