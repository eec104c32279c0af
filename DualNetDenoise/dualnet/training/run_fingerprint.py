"""What a training run trains, so that a resumed run can be checked to train the same thing.

A checkpoint stores the run's fingerprint: its config without the fields that only control the run
(:data:`RUN_CONTROL_FIELDS`: how long, on what, how often it reports), whether it is self-supervised
or masked, and for every training and validation image its shape, split, weight, normalisation, noise
model and a digest of its voxels. Images are compared by content, not by path: the Slicer panel stages
a scene volume under a new temporary name for every run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Sequence

import numpy as np

from .config import TrainConfig

#: config fields a resumed run may change: the run's length, device, threads, reporting, the data
#: paths (the data itself is compared by content), the starting model (a resume starts from the
#: checkpoint; the panel's shipped model moves when the extension is updated), what is exported and
#: how the checkpoint to export is chosen, and the check after fine-tuning
RUN_CONTROL_FIELDS = ("steps", "device", "num_workers", "threads", "time_budget_s", "checkpoint_every",
                      "val_every", "log_every", "patience", "data_dir", "data", "init_from", "base_check",
                      "export_best", "select_on", "val_patches", "amp", "config_version")
#: relative tolerance of the floats derived from the data (normalisation, noise models): the voxels
#: themselves are compared by digest; an estimate may differ in its last bits between machines
FLOAT_RTOL = 1e-6


def run_fingerprint(cfg: TrainConfig, train_images: Sequence[Any], val_images: Sequence[Any], *,
                    selfsup: bool, masked: bool) -> Dict[str, Any]:
    """The fingerprint of a run (JSON-safe): config, kind of loss, and its images (``CleanImage``)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RUN_CONTROL_FIELDS}
    images = [_image_fingerprint(im, "train") for im in train_images]
    images += [_image_fingerprint(im, "val") for im in val_images]
    return json.loads(json.dumps({"config": config, "selfsup": bool(selfsup), "masked": bool(masked),
                                  "images": images}, default=float))


def _image_fingerprint(image: Any, side: str) -> Dict[str, Any]:
    arr = np.ascontiguousarray(image.array)
    digest = hashlib.blake2b(arr.view(np.uint8).reshape(-1), digest_size=16)
    digest.update(f"{arr.dtype}{arr.shape}".encode())
    source = getattr(image, "source", None) or {}
    return {"side": side, "shape": list(arr.shape), "digest": digest.hexdigest(),
            "params": [float(v) for v in image.params], "weight": source.get("weight"),
            "noise_var": None if image.noise_var is None else [float(v) for v in image.noise_var]}


def fingerprint_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two fingerprints, one phrase each (empty when the runs train the same)."""
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in ("selfsup", "masked")
               if old.get(key) != new.get(key)]
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    first = ("stage", "model", "modality")  # the biggest differences first
    defaults = TrainConfig().to_dict()
    for key in sorted(set(old_cfg) | set(new_cfg), key=lambda k: (k not in first, k)):
        old_value = old_cfg.get(key, defaults.get(key))  # a field newer than the checkpoint: its default
        if old_value != new_cfg.get(key, defaults.get(key)):
            changes.append(f"{key} {old_value!r} -> {new_cfg.get(key)!r}")
    old_im, new_im = old.get("images", []), new.get("images", [])
    if len(old_im) != len(new_im):
        changes.append(f"the images ({len(old_im)} -> {len(new_im)})")
    else:
        for kind in ("digest", "shape", "side", "weight", "params", "noise_var"):
            n = sum(not _same(a.get(kind), b.get(kind)) for a, b in zip(old_im, new_im))
            if n:
                what = {"digest": "voxels", "side": "train/validation split", "noise_var": "noise model",
                        "params": "normalisation"}.get(kind, kind)
                changes.append(f"the {what} of {n} of the {len(new_im)} images")
    return changes


def _same(a: Any, b: Any) -> bool:
    """Equal, numbers (and lists of them) within :data:`FLOAT_RTOL`."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= FLOAT_RTOL * max(abs(float(a)), abs(float(b)), 1e-30)
        except (TypeError, ValueError):
            return False
    return a == b
