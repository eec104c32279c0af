"""Pack the clean LOW-RESOLUTION training images of a training config into one .npz per source.

Why: the GPU machine used to train the shipped models has no SimpleITK and a 64 MiB transfer
limit. The anti-alias blur and downsampling of ``dualnet.degrade`` are deterministic, so
pre-computing the clean low-resolution images here and training there with ``lr_factor = 1``
(noise added on the fly, no further blur) gives exactly the pairs that training with
``lr_factor = 2`` on the original files gives. The packed config is written beside the data.

    python scripts/pack_lr_data.py DualNetDenoise/dualnet/configs/pretrain_mri.toml --out .gpu/mri
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from dualnet.degrade import downsample, lr_factors  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402
from dualnet.training.data import read_data_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="folder for the .npz files and config.toml")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--float16", action="store_true",
                    help="store the images as float16 (ultrasound: halves the transfer; rounding 0.06 grey levels)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, src in enumerate(cfg.data):
        items = read_data_source(src, args.data_dir)  # skull-stripped / coarsened as the config says
        arrays = {}
        for j, (arr, spacing_zyx, name) in enumerate(items):
            f = lr_factors(arr.ndim, cfg.lr_factor, getattr(cfg, "anisotropy", None))
            lr, _ = downsample(arr, f)
            arrays[f"image_{j}"] = lr.astype(np.float16 if args.float16 else np.float32)
            arrays[f"spacing_{j}"] = np.asarray(spacing_zyx, float) * np.asarray(f, float)
        name = f"{i:02d}_{src.split}.npz"
        np.savez_compressed(out / name, **arrays)
        sources.append(dataclasses.replace(src, path=name, frame=None, crop=None, frames=None, brain_mask=None,
                                           coarsen=None, licence=src.licence or f"from {src.path}"))
        print(f"{src.path} ({src.split}): {len(items)} image(s) -> {name}, "
              f"LR shape {arrays['image_0'].shape}, {(out / name).stat().st_size / 2**20:.1f} MiB")
    packed = cfg.replace(data=sources, lr_factor=1)
    header = (f"# Packed by scripts/pack_lr_data.py from {args.config}: the clean images were blurred and\n"
              f"# downsampled by lr_factor = {cfg.lr_factor} here; training adds noise only (lr_factor = 1).\n"
              f"# Sources: {', '.join(s.path for s in cfg.data)}\n")
    (out / "config.toml").write_text(header + packed.to_toml(), encoding="utf-8")
    print(f"wrote {out / 'config.toml'}")


if __name__ == "__main__":
    main()
