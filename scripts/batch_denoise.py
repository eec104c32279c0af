#!/usr/bin/env python
"""Denoise every volume in a folder (files and DICOM series folders); write results and a CSV.

Runs with plain Python (the ``dualnet`` core from this checkout or ``pip install .``) and
inside Slicer without a window::

    python scripts/batch_denoise.py IN_DIR OUT_DIR --method bm4d --modality mri
    Slicer --no-main-window --python-script scripts/batch_denoise.py -- IN_DIR OUT_DIR --method gaussian

Each input ``name.ext`` gives ``OUT_DIR/name_<method>.nrrd`` (``--format`` to change);
``OUT_DIR/summary.csv`` lists input, output, status, seconds, noise sigma and any error.
One failing volume does not stop the batch; the exit code is 1 when any failed.
Only the core is used (``dualnet.io``, ``dualnet.api``), no MRML nodes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CORE = HERE.parent / "DualNetDenoise"
if (_CORE / "dualnet").is_dir() and str(_CORE) not in sys.path:
    sys.path.insert(0, str(_CORE))

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
CSV_FIELDS = ["input", "output", "status", "method", "modality", "shape_zyx", "spacing_xyz", "sigma", "seconds", "error"]


def in_slicer() -> bool:
    """True when running inside the Slicer application (not just with the slicer-core wheel)."""
    mod = sys.modules.get("slicer")
    if mod is None:
        try:
            import slicer as mod  # noqa: F401
        except ImportError:
            return False
    return hasattr(mod, "app") and mod.app is not None


def _is_dicom_folder(path: Path) -> bool:
    files = [f for f in path.iterdir() if f.is_file()]
    return bool(files) and (any(f.suffix.lower() == ".dcm" for f in files) or all(f.suffix == "" for f in files))


def find_inputs(folder: Path, recursive_dicom: bool = True):
    """Volume files in ``folder`` (sorted) and its sub-folders holding a DICOM series."""
    items = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES) and not p.name.startswith("."):
            items.append(p)
        elif p.is_dir() and recursive_dicom and _is_dicom_folder(p):
            items.append(p)
    return items


def stem(path: Path) -> str:
    name = path.name
    for suf in VOLUME_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path, help="folder with volumes (NIfTI, NRRD, MHA, PNG) and/or DICOM series folders")
    parser.add_argument("output_dir", type=Path, help="folder for results (created); must differ from input_dir")
    parser.add_argument("--method", default="dualnet", help="dualnet, bm4d, bm3d, nlm, gaussian, median, diffusion")
    parser.add_argument("--modality", default="mri", choices=["mri", "ct", "us"])
    parser.add_argument("--sigma", type=float, default=None, help="noise sigma in image units (classical methods); default estimated")
    parser.add_argument("--model", default=None, help="DUAL-NET model file; default shipped model")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (network only)")
    parser.add_argument("--format", default=".nrrd", choices=[".nrrd", ".nii.gz", ".mha", "same"],
                        help="output format (default .nrrd; 'same' keeps the input's, DICOM -> .nrrd)")
    parser.add_argument("--csv", type=Path, default=None, help="summary CSV (default OUT_DIR/summary.csv)")
    parser.add_argument("--overwrite", action="store_true", help="redo volumes whose output exists")
    return parser.parse_args(argv)


def run(args) -> int:
    from dualnet import api
    from dualnet.errors import DualNetError
    from dualnet.io import read_volume, write_volume

    if not args.input_dir.is_dir():
        print(f"batch_denoise: {args.input_dir}: not a folder", file=sys.stderr)
        return 2
    if args.output_dir.resolve() == args.input_dir.resolve():
        print("batch_denoise: output folder must differ from the input folder", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    inputs = find_inputs(args.input_dir)
    if not inputs:
        print(f"batch_denoise: no volumes found in {args.input_dir}", file=sys.stderr)
        return 2
    csv_path = args.csv or (args.output_dir / "summary.csv")
    rows, failed = [], 0
    for n, src in enumerate(inputs, start=1):
        fmt = args.format
        if fmt == "same":
            fmt = ".nrrd" if src.is_dir() else next(s for s in VOLUME_SUFFIXES if src.name.lower().endswith(s))
        dst = args.output_dir / f"{stem(src)}_{args.method}{fmt}"
        row = {"input": str(src), "output": str(dst), "method": args.method, "modality": args.modality}
        print(f"[{n}/{len(inputs)}] {src.name} -> {dst.name}", flush=True)
        if dst.exists() and not args.overwrite:
            row.update(status="skipped (exists)")
            rows.append(row)
            continue
        t0 = time.time()
        try:
            vol = read_volume(src)
            kwargs = dict(method=args.method, modality=args.modality, sigma=args.sigma, device=args.device)
            if args.method == "dualnet":
                kwargs.update(model=args.model, tta=args.tta)
            result = api.denoise_volume(vol, **kwargs)
            write_volume(result.volume, dst, inputs=[src])
            info = dict(result.info or {})
            row.update(status="ok", shape_zyx="x".join(map(str, vol.array.shape)),
                       spacing_xyz="x".join(f"{s:g}" for s in vol.spacing),
                       sigma=info.get("sigma", ""), seconds=f"{time.time() - t0:.2f}")
        except (DualNetError, OSError, RuntimeError, ValueError, MemoryError) as err:
            failed += 1
            row.update(status="failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__,
                       seconds=f"{time.time() - t0:.2f}")
            print(f"  failed: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    print(json.dumps({"volumes": len(rows), "failed": failed, "csv": str(csv_path)}), flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer --python-script script.py -- args
        argv = argv[1:]
    return run(parse_args(argv))


if __name__ == "__main__":
    code = main()
    if in_slicer():  # pragma: no cover - inside Slicer
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)
