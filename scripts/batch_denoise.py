#!/usr/bin/env python
"""Denoise every volume in a folder (files and DICOM series folders); write results and a CSV.

Runs with plain Python (the ``dualnet`` core from this checkout or ``pip install .``) and
inside Slicer without a window::

    python scripts/batch_denoise.py IN_DIR OUT_DIR --method bm4d --modality mri
    Slicer --no-main-window --python-script scripts/batch_denoise.py -- IN_DIR OUT_DIR --method gaussian

Each input ``name.ext`` gives ``OUT_DIR/name_<method>.nrrd`` (``--format`` to change);
``OUT_DIR/summary.csv`` lists input, output, status, seconds, noise sigma and any error.
One failing volume does not stop the batch. Every failure ends the process (also inside Slicer,
through ``slicer.util.exit``) with one line on stderr and an exit code: 0 all done, 1 a volume
or the script failed, 2 bad arguments or folders, 3 a Python package is missing (named, with how
to install it; an interactive Slicer offers to install it), 130 interrupted.
Only the core (``dualnet.io``, ``dualnet.api``) and ``DualNetDenoiseLib.dependencies`` are used, no MRML nodes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CORE = HERE.parent / "DualNetDenoise"
if (_CORE / "dualnet").is_dir() and str(_CORE) not in sys.path:
    sys.path.insert(0, str(_CORE))

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
CSV_FIELDS = ["input", "output", "status", "method", "modality", "shape_zyx", "spacing_xyz", "sigma", "seconds", "error"]


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_PACKAGE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class MissingPackage(RuntimeError):
    """A Python package the method needs is not installed (the message names it)."""


def in_slicer() -> bool:
    """True when running inside the Slicer application (not just with the slicer-core wheel).

    Inside Slicer ``slicer`` is always imported already; the wheel is never imported here.
    """
    mod = sys.modules.get("slicer")
    return mod is not None and getattr(mod, "app", None) is not None


def slicer_interactive() -> bool:
    """Inside Slicer with a main window: the user can be asked before installing packages."""
    if not in_slicer():
        return False
    import slicer

    try:
        return not slicer.app.commandOptions().noMainWindow
    except Exception:
        return False


#: errors whose message says it all (with the core's DualNetError); others get their type name
PLAIN_ERRORS = (OSError, ValueError, RuntimeError, MemoryError)


def one_line(err: BaseException) -> str:
    """The first line of an error message; prefixed with the type for unexpected error types."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    core_errors = sys.modules.get("dualnet.errors")  # imported once the core raised one of its errors
    if text and (isinstance(err, PLAIN_ERRORS) or (core_errors and isinstance(err, core_errors.DualNetError))):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def missing_package_message(err: ImportError) -> str:
    """One line for an ImportError raised while running: the package and how to get it."""
    name = (getattr(err, "name", None) or "").split(".")[0]
    try:
        from DualNetDenoiseLib.dependencies import OPTIONAL_PACKAGES, PIP_PACKAGES
    except ImportError:
        PIP_PACKAGES, OPTIONAL_PACKAGES = {}, {}
    requirement = PIP_PACKAGES.get(name) or OPTIONAL_PACKAGES.get(name) or (name or "?")
    return f"missing Python package '{name or err}' ({one_line(err)}); install {requirement}"


def check_dependencies(method: str) -> None:
    """Install (interactive Slicer, after one confirmation) or name what ``method`` needs.

    Raises:
        MissingPackage: with one line naming the packages.
    """
    try:
        from DualNetDenoiseLib import dependencies
    except ImportError:  # the core without the Slicer glue (pip-installed dualnet): checked while running
        return
    kwargs = {}
    if slicer_interactive():
        import slicer

        kwargs = dict(confirm=slicer.util.confirmOkCancelDisplay, pip_install=dependencies.slicer_pip_install,
                      install_torch=dependencies.slicer_install_torch)
    try:
        dependencies.ensure_dependencies(method, interactive=bool(kwargs), **kwargs)
    except dependencies.DependencyError as err:
        raise MissingPackage(str(err)) from None


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
    check_dependencies(args.method)
    csv_path = args.csv or (args.output_dir / "summary.csv")
    rows = []
    try:
        failed = denoise_all(args, inputs, rows)
    finally:  # also when a missing package aborts the batch: what was done is listed
        write_summary(csv_path, rows)
    print(json.dumps({"volumes": len(rows), "failed": failed, "csv": str(csv_path)}), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def denoise_all(args, inputs, rows) -> int:
    """Denoise each input, appending a summary row; returns the number of failures.

    A volume that fails (bad file, error in the core) is recorded and the batch goes on; a missing
    Python package stops it (every further volume would fail the same way).
    """
    from dualnet import api
    from dualnet.io import read_volume, write_volume

    failed = 0
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
        except ImportError as err:
            row.update(status="failed", error=missing_package_message(err), seconds=f"{time.time() - t0:.2f}")
            rows.append(row)
            raise MissingPackage(row["error"]) from None
        except Exception as err:  # noqa: BLE001 - any error of the core fails this volume only
            failed += 1
            row.update(status="failed", error=one_line(err), seconds=f"{time.time() - t0:.2f}")
            print(f"  failed: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
    return failed


def write_summary(csv_path: Path, rows) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})


def main(argv=None) -> int:
    """Run the batch; every outcome is an exit code, never an exception (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer --python-script script.py -- args
        argv = argv[1:]
    try:
        return run(parse_args(argv))
    except SystemExit as err:  # argparse: --help (0) or bad arguments (2, message printed)
        return err.code if isinstance(err.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("batch_denoise: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except MissingPackage as err:
        print(f"batch_denoise: error: {err}", file=sys.stderr, flush=True)
        return EXIT_MISSING_PACKAGE
    except ImportError as err:  # the core itself cannot be imported
        print(f"batch_denoise: error: {missing_package_message(err)}", file=sys.stderr, flush=True)
        return EXIT_MISSING_PACKAGE
    except BaseException as err:  # noqa: BLE001 - never leave Slicer running without an exit code
        print(f"batch_denoise: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def exit_process(code: int) -> None:
    """End the process: ``slicer.util.exit`` inside Slicer (its event loop would keep it alive), else ``sys.exit``."""
    if in_slicer():
        try:
            import slicer

            slicer.util.exit(code)
            return
        except Exception as err:  # noqa: BLE001
            print(f"batch_denoise: slicer.util.exit failed ({one_line(err)}); exiting directly", file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
