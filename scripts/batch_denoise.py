#!/usr/bin/env python
"""Denoise every volume in a folder (files and DICOM series folders); write results and a CSV.

Runs with plain Python (the ``dualnet`` core from this checkout or ``pip install .``) and
inside Slicer without a window::

    python scripts/batch_denoise.py IN_DIR OUT_DIR --method bm4d
    Slicer --no-main-window --python-script scripts/batch_denoise.py -- IN_DIR OUT_DIR --method gaussian
    python scripts/batch_denoise.py STUDY_DIR OUT_DIR --dicom --method bm4d [--send AET@HOST:PORT]

Each input ``name.ext`` gives ``OUT_DIR/name_<method>.nrrd`` (``--format`` to change);
``OUT_DIR/summary.csv`` lists input, output, status, modality, seconds, noise sigma, any error and any warning.
``--modality auto`` (the default) takes each volume's modality from its DICOM Modality tag, else from
its intensities (air at -1000 HU: CT; an 8-bit 2D image: ultrasound; otherwise MRI); the reason is
printed and written to the ``note`` column (``dualnet.modality.choose_modality``).
With ``--dicom`` every CT / MR series found under IN_DIR (nested folders, an exported study) is
written as a new derived DICOM series in ``OUT_DIR/<NNN>_<modality>_<description>/`` (see
``dualnet.dicom_out``), its noise model taken from the DICOM Modality tag unless a ``--modality``
is given; non-image objects (SR, RT, presentation states) are skipped; summary.csv has one row
per series and per skipped object. OUT_DIR must be new or empty (nothing is overwritten).
``--send`` then stores the written series with C-STORE.
One failing volume does not stop the batch. Every failure ends the process (also inside Slicer,
through ``slicer.util.exit``) with one line on stderr and an exit code: 0 all done, 1 a volume
or the script failed (also: ``--send`` did not store every instance; the files are kept),
2 bad arguments or folders, 3 a Python package is missing (named, with how to install it; an
interactive Slicer offers to install it), 130 interrupted.
Only the core (``dualnet.io``, ``dualnet.api``, ``dualnet.dicom_out``, ``dualnet.dicom_send``) and
``DualNetDenoiseLib.dependencies`` are used, no MRML nodes.
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
#: the last three are filled by --dicom (source series, new Series Instance UID, skip reason / modality note);
#: for volume files, note is why the modality was chosen
CSV_FIELDS = ["input", "output", "status", "method", "modality", "shape_zyx", "spacing_xyz", "sigma", "seconds",
              "error", "warning", "series", "derived_series_uid", "note"]


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
    from dualnet.api import refuse_network_options
    from dualnet.cli import SIGMA_MEANING, add_precision_option, add_tta_options
    from dualnet.errors import InputError
    from dualnet.orthoviews import parse_views

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path, help="folder with volumes (NIfTI, NRRD, MHA, PNG) and/or DICOM series folders")
    parser.add_argument("output_dir", type=Path, help="folder for results (created); must differ from input_dir")
    parser.add_argument("--method", default="dualnet", help="dualnet, bm4d, bm3d, nlm, gaussian, median, diffusion")
    parser.add_argument("--modality", default="auto", choices=["auto", "mri", "ct", "us"],
                        help="noise model; auto (default): from each volume's DICOM Modality tag, else from its "
                             "intensities (air at -1000 HU: ct; 8-bit 2D image: us; otherwise mri)")
    parser.add_argument("--sigma", type=float, default=None,
                        help=f"the noise level of every volume: {SIGMA_MEANING}; used by the classical methods "
                             "and the network alike, so give it only for a folder of one modality; default "
                             "estimated from each volume")
    parser.add_argument("--model", default=None, help="DUAL-NET model file; default shipped model")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    add_precision_option(parser)
    add_tta_options(parser)
    parser.add_argument("--no-guard", action="store_true",
                        help="network: no SURE guard (by default MRI / CT results are blended with the input "
                             "where SURE estimates that lowers the error)")
    parser.add_argument("--views", default="auto", choices=["auto", "1", "3"],
                        help="network: slice orientations averaged, 1 (z) or 3 (z, y, x; three times the time); "
                             "auto (default) = 3 where the model was trained for it (MRI, CT) and the voxels are near-isotropic")
    parser.add_argument("--format", default=None, choices=[".nrrd", ".nii.gz", ".mha", "same"],
                        help="output format (default .nrrd; 'same' keeps the input's, DICOM -> .nrrd)")
    parser.add_argument("--csv", type=Path, default=None, help="summary CSV (default OUT_DIR/summary.csv)")
    parser.add_argument("--overwrite", action="store_true", help="redo volumes whose output exists")
    parser.add_argument("--dicom", action="store_true",
                        help="write every CT/MR series found (nested folders) as a new derived DICOM series "
                             "in OUT_DIR/<NNN>_<modality>_<description>/")
    parser.add_argument("--send", metavar="AET@HOST:PORT", default=None,
                        help="with --dicom: store the written series on this DICOM node (C-STORE)")
    args = parser.parse_args(argv)
    try:  # as `dualnet denoise`: refused, not ignored
        refuse_network_options(args.method, model=args.model, device=args.device, tta=args.tta,
                               guard=False if args.no_guard else None, views=parse_views(args.views),
                               precision=args.precision)
    except InputError as err:
        parser.error(str(err))
    return args


def run(args) -> int:
    if not args.input_dir.is_dir():
        print(f"batch_denoise: {args.input_dir}: not a folder", file=sys.stderr)
        return 2
    if args.output_dir.resolve() == args.input_dir.resolve():
        print("batch_denoise: output folder must differ from the input folder", file=sys.stderr)
        return 2
    if args.dicom or args.send:
        return run_dicom(args)
    args.format = args.format or ".nrrd"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    inputs = find_inputs(args.input_dir)
    if not inputs:
        print(f"batch_denoise: no volumes found in {args.input_dir}", file=sys.stderr)
        return 2
    names = output_names(inputs, args.output_dir, args.method, args.format)
    csv_path = args.csv or (args.output_dir / "summary.csv")
    from dualnet.errors import InputError
    from dualnet.io import check_output_path

    try:  # before any work: the summary must not replace an input or a result
        check_output_path(csv_path, inputs, outputs=list(names.values()), formats=None)
    except InputError as err:
        print(f"batch_denoise: --csv: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    check_dependencies(args.method)
    rows = []
    try:
        failed = denoise_all(args, inputs, rows, names)
    finally:  # also when a missing package aborts the batch: what was done is listed
        write_summary(csv_path, rows, inputs=inputs, outputs=list(names.values()))
    print(json.dumps({"volumes": len(rows), "failed": failed, "csv": str(csv_path)}), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def output_names(inputs, output_dir: Path, method: str, fmt_option: str) -> dict:
    """``OUT_DIR/<stem>_<method><format>`` for each input. Inputs that share a stem (``scan.nii.gz``,
    ``scan.nrrd``, a DICOM folder ``scan/``; letter case ignored, as on macOS and Windows) also carry
    their own format in the name (``scan-nii-gz_...``, ``scan-nrrd_...``, ``scan-dicom_...``), so no
    result replaces another's."""
    from collections import Counter

    stems = Counter(stem(src).lower() for src in inputs)
    names = {}
    for src in inputs:
        fmt = fmt_option
        if fmt == "same":
            fmt = ".nrrd" if src.is_dir() else next(s for s in VOLUME_SUFFIXES if src.name.lower().endswith(s))
        base = stem(src)
        if stems[base.lower()] > 1:
            kind = "dicom" if src.is_dir() else src.name[len(base):].lstrip(".").lower().replace(".", "-")
            base = f"{base}-{kind}"
        names[src] = output_dir / f"{base}_{method}{fmt}"
    return names


def denoise_all(args, inputs, rows, names: dict) -> int:
    """Denoise each input into ``names[input]``, appending a summary row; returns the number of failures.

    A volume that fails (bad file, error in the core) is recorded and the batch goes on; a missing
    Python package stops it (every further volume would fail the same way).
    """
    from dualnet import api
    from dualnet.io import read_volume, write_volume

    failed = 0
    for n, src in enumerate(inputs, start=1):
        dst = names[src]
        row = {"input": str(src), "output": str(dst), "method": args.method,
               "modality": "" if args.modality == "auto" else args.modality}
        print(f"[{n}/{len(inputs)}] {src.name} -> {dst.name}", flush=True)
        if dst.exists() and not args.overwrite:
            row.update(status="skipped (exists)")
            rows.append(row)
            continue
        t0 = time.time()
        try:
            vol = read_volume(src)
            result = api.denoise_volume(vol, **denoise_kwargs(args))
            write_volume(result.volume, dst, inputs=[src])
            info = dict(result.info or {})
            print(f"  modality {info.get('modality')} ({info.get('modality_reason', '')})", flush=True)
            warnings = api.result_warnings(info)
            for line in warnings:
                print(f"  warning: {line}", file=sys.stderr, flush=True)
            row.update(status="ok", modality=info.get("modality", ""), note=info.get("modality_reason", ""),
                       warning="; ".join(warnings),
                       shape_zyx="x".join(map(str, vol.array.shape)),
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


# ----------------------------------------------------------------------------- --dicom
def dicom_usage_error(args) -> str:
    """One line saying why the options do not fit ``--dicom`` ('' when they do)."""
    if not args.dicom:
        return "--send needs --dicom (only DICOM output can be sent)"
    if args.format is not None:
        return "--format does not apply to --dicom (the result is a DICOM series)"
    if args.overwrite:
        return "--overwrite does not apply to --dicom (each derived series goes into a new subfolder)"
    return ""


def check_dicom_folders(args):
    """The parsed ``--send`` node (or None); refuses an output folder inside or around the input, or not empty.

    Raises:
        dualnet.errors.InputError: one line (bad node, overlapping folders, earlier results there).
    """
    from dualnet.dicom_out import path_inside
    from dualnet.errors import InputError

    out = args.output_dir
    if path_inside(out, args.input_dir) or path_inside(args.input_dir, out):
        raise InputError(f"{out}: output folder must not be, contain or lie inside the input folder")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: output folder is not empty; choose a new or empty folder "
                         "(derived series are never overwritten)")
    if not args.send:
        return None
    import pynetdicom  # noqa: F401 - a missing package is named (exit 3) before any work

    from dualnet.dicom_send import parse_node

    return parse_node(args.send)


def run_dicom(args) -> int:
    """``--dicom``: one derived series per source series, summary rows, optional C-STORE."""
    usage = dicom_usage_error(args)
    if usage:
        print(f"batch_denoise: {usage}", file=sys.stderr)
        return EXIT_USAGE
    from dualnet.errors import InputError
    from dualnet.io import check_output_path

    try:
        node = check_dicom_folders(args)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        check_output_path(args.csv or (args.output_dir / "summary.csv"), [args.input_dir], formats=None)
    except InputError as err:
        print(f"batch_denoise: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    check_dependencies(args.method)
    try:
        report = denoise_dicom(args)
    except InputError as err:  # no image series found, unusable output folder
        print(f"batch_denoise: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:  # the series finished before stay, listed in the summary; nothing sent
        partial = getattr(err, "partial_report", None)
        if partial is not None:
            write_summary(args.csv or (args.output_dir / "summary.csv"), dicom_rows(partial, args),
                          inputs=[args.input_dir])
            done = sum(o.status == "ok" for o in partial.outcomes)
            print(f"batch_denoise: interrupted; {done} series finished before are kept in {args.output_dir} "
                  "(summary.csv lists them)", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        raise
    return finish_dicom(args, report, node)


def finish_dicom(args, report, node) -> int:
    """Summary CSV and lines of a ``--dicom`` run, failures on stderr, then the optional C-STORE."""
    from dualnet.api import result_warnings

    csv_path = args.csv or (args.output_dir / "summary.csv")
    write_summary(csv_path, dicom_rows(report, args), inputs=[args.input_dir])
    for line in report.summary_lines()[len(report.outcomes):]:
        print(line, flush=True)
    for o in report.outcomes:
        if o.status == "ok":
            for line in result_warnings(o.info or {}):
                print(f"  warning: {o.source.folder}: {line}", file=sys.stderr, flush=True)
    missing = next((o for o in report.outcomes if o.missing_package), None)
    if missing is not None:  # as for volume files: every further series would fail the same way
        raise MissingPackage(series_error(missing))
    failed = [o for o in report.outcomes if o.status != "ok"]
    for o in failed:
        print(f"  failed: {o.source.folder}: {o.error}", file=sys.stderr, flush=True)
    code = EXIT_FAILED if failed else EXIT_OK
    if node is not None and report.written_files:
        code = send_series(report.written_files, node) or code
    print(json.dumps({"volumes": len(report.outcomes), "skipped": sum(s.dicom for s in report.skipped),
                      "failed": len(failed), "csv": str(csv_path)}), flush=True)
    return code


def denoise_dicom(args):
    """:func:`dualnet.dicom_out.denoise_dicom_folder` on the input folder, one subfolder per series."""
    from dualnet.dicom_out import denoise_dicom_folder

    return denoise_dicom_folder(args.input_dir, args.output_dir, layout="subfolders",
                                log=lambda line: print(line, flush=True), **denoise_kwargs(args))


def denoise_kwargs(args) -> dict:
    """The denoising options of ``args`` for :func:`dualnet.api.denoise_volume` (files and DICOM
    series alike): the network's own options only with ``--method dualnet``."""
    from dualnet.orthoviews import parse_views

    kwargs = dict(method=args.method, modality=args.modality, sigma=args.sigma, device=args.device)
    if args.method == "dualnet":
        kwargs.update(model=args.model, tta=args.tta, guard=False if args.no_guard else None,
                      views=parse_views(args.views), precision=args.precision)
    return kwargs


def dicom_rows(report, args) -> list:
    """Summary rows: one per source series (ok or failed), then one per skipped DICOM object."""
    from dualnet.api import result_warnings

    rows = []
    for o in report.outcomes:
        d = o.derived
        rows.append({"input": str(o.source.folder or o.source.files[0].parent), "output": str(d.folder) if d else "",
                     "status": o.status, "method": args.method, "modality": o.modality or args.modality or "",
                     "shape_zyx": derived_shape(o), "sigma": o.info.get("sigma", ""), "seconds": f"{o.seconds:.2f}",
                     "error": series_error(o), "warning": "; ".join(result_warnings(o.info or {})),
                     "series": o.source.label(),
                     "derived_series_uid": d.series_uid if d else "", "note": o.info.get("modality_note", "")})
    for s in report.skipped:
        if s.dicom:
            note = f"{s.count} files: {s.reason}" if s.count > 1 else s.reason
            rows.append({"input": str(s.path), "status": "skipped", "method": args.method, "note": note})
    return rows


def series_error(outcome) -> str:
    """The error of a series outcome; a failed import names the package and how to install it."""
    if not outcome.missing_package:
        return outcome.error
    name = outcome.missing_package
    return missing_package_message(ModuleNotFoundError(f"No module named '{name}'", name=name))


def derived_shape(outcome) -> str:
    """``ZxYxX`` of a written series (slices x rows x columns of its first instance); '' when none."""
    if outcome.derived is None or not outcome.derived.files:
        return ""
    import pydicom

    ds = pydicom.dcmread(str(outcome.derived.files[0]), stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return f"{len(outcome.derived.files)}x{ds.Rows}x{ds.Columns}"


def send_series(files, node) -> int:
    """C-STORE ``files`` to ``node``: one status line each; EXIT_FAILED (one line on stderr) unless all stored."""
    from dualnet.dicom_send import SendError, send_files

    try:
        statuses = send_files(files, node)
    except SendError as err:
        print(f"batch_denoise: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    for st in statuses:
        print(st.line(), flush=True)
    bad = sum(not st.stored for st in statuses)
    print(f"sent {len(statuses) - bad}/{len(statuses)} instances to {node}", flush=True)
    if bad:
        print(f"batch_denoise: error: {bad} of {len(statuses)} instances not stored on {node}; files kept on disk",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


def write_summary(csv_path: Path, rows, inputs=(), outputs=()) -> None:
    """The summary CSV, written atomically and never over one of ``inputs`` (or into an input
    folder) or ``outputs``."""
    import io

    from dualnet.io import atomic_write_bytes

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    atomic_write_bytes(csv_path, text.getvalue().encode("utf-8"), inputs=inputs, outputs=outputs)


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
