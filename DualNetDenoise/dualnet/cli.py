"""The ``dualnet`` command: denoise, degrade, dice, estimate, demo, train, finetune, evaluate.

Every sub-command reads volumes with their geometry, writes outputs atomically and never over an
input, prints one line ``dualnet: error: ...`` and exits non-zero on bad input.
Exit codes: 0 success, 1 unexpected failure, 2 bad input or model, 3 DICOM written but sending
(``--send``) failed, 130 cancelled.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from io import StringIO
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import __version__
from .errors import CancelledError, DualNetError
from .io import (INTEGER_FORMATS, atomic_write_bytes, cast_like, check_output_format, check_output_path, read_volume,
                 write_volume)
from .modality import AUTO, MODALITY_CHOICES, ModalityChoice, choose_modality
from .precision import PRECISIONS

MODALITY_HELP = (
    "noise physics: auto (default) = from the DICOM Modality tag, else from the intensities (air at -1000 HU: "
    "ct; 8-bit 2D image: us; otherwise mri), said on stderr; mri = Rician magnitude, "
    "ct = Poisson-Gaussian low dose (HU), us = multiplicative speckle"
)
LEVEL_HELP = (
    "noise level: MRI = Rician sigma as a fraction of the clean maximum (0.05 = 5%%); "
    "CT = dose fraction of the full dose (0.25 = 25%%); US = number of looks L of the Gamma speckle (4)"
)

#: What a given ``--sigma`` means, for every method and sub-command (dualnet.training.data.noise_variance_model)
SIGMA_MEANING = (
    "MRI the Rician sigma (image units), CT the noise std at water (HU; the scan's own fit keeps how it "
    "grows with the signal), US the relative speckle std 1/sqrt(looks)"
)


# ----------------------------------------------------------------------------- arguments
class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line ``dualnet: error: <command>: <problem>`` (exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        where = self.prog.split()[-1] if " " in self.prog else self.prog
        self.exit(2, f"dualnet: error: {where}: {message}\n")


def _seed(text: str) -> int:
    """A random seed: a whole number in 0 .. 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number 0..{2**32 - 1}, got {text!r}")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is a whole number 0..{2**32 - 1}, got {text!r}")
    return value


def _count(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------- progress
class ProgressPrinter:
    """A ``ProgressFn`` that drives a tqdm bar, JSON lines, or nothing.

    The bar shows the remaining time only while the fraction moves: a report repeating the last
    fraction (a heartbeat of work that gives no finer progress, e.g. a BM4D pass) shows the elapsed
    time alone instead of an extrapolated ETA. Messages are shown whole; tqdm trims the line to
    the terminal's width.
    """

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}"
    FORMAT_WAITING = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}] {postfix}"

    def __init__(self, desc: str, mode: str = "bar") -> None:
        self.mode = mode
        self.bar = None
        self.desc = desc
        self.last_message = ""
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, file=sys.stderr,
                            dynamic_ncols=True, bar_format=self.FORMAT_WAITING)

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.mode == "json":
            print("DUALNET_PROGRESS " + json.dumps({"task": self.desc, "fraction": round(fraction, 4), "message": message}),
                  flush=True)
        elif self.bar is not None:
            n = int(round(fraction * 1000))
            moved = n != self.bar.n
            self.bar.n = n
            self.bar.bar_format = self.FORMAT if (moved and 0 < n < 1000) else self.FORMAT_WAITING
            if message and message != self.last_message:
                self.bar.set_postfix_str(message, refresh=False)
                self.last_message = message
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_mode(args) -> str:
    if getattr(args, "progress_json", False):
        return "json"
    if getattr(args, "quiet", False):
        return "none"
    return "bar"


def _info(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr if getattr(args, "progress_json", False) else sys.stdout)


def _warn(message: str) -> None:
    """One line ``dualnet: warning: ...`` on stderr (also with --quiet)."""
    print(f"dualnet: warning: {message}", file=sys.stderr, flush=True)


def _say_modality(args, choice: ModalityChoice) -> None:
    """``dualnet: modality ct (why)`` on stderr, unless --quiet; once the run succeeded, so that a failed
    run prints its one error line only (the progress bar names the modality while it runs)."""
    _note(args, f"modality {choice.modality} ({choice.reason})")


def _note(args, message: str) -> None:
    """``dualnet: MESSAGE`` on stderr unless --quiet: what the run chose for the user, said once it succeeded."""
    if not getattr(args, "quiet", False):
        print(f"dualnet: {message}", file=sys.stderr, flush=True)


def _read_input(path: str, frame: Optional[int], irregular_ok: bool = False):
    """``read_volume(path, frame=frame, irregular_ok=...)``; refuses ``--frame`` for an image that is not 4D (nothing to choose).

    Refused like ``--tta`` with a classical method (``api.check_options``): an option that cannot
    apply is an error, not a silent no-op.
    """
    from .errors import InputError

    if frame is not None:
        dim = _image_dimension(path)
        if dim is not None and dim != 4:
            raise InputError(f"{path}: --frame applies to 4D images only; this image is {dim}D")
    return read_volume(path, frame=frame, irregular_ok=irregular_ok)


def _image_header(path: str):
    """The SimpleITK reader of a file with its header read, or None for a folder, a missing or an
    unreadable file (``read_volume`` then says why)."""
    import SimpleITK as sitk

    from .io import quiet_itk

    p = Path(path)
    if not p.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _image_dimension(path: str) -> Optional[int]:
    """Dimension from the file header (3 for a DICOM folder); None when unreadable (``read_volume`` says why)."""
    if Path(path).is_dir():
        return 3
    reader = _image_header(path)
    return None if reader is None else int(reader.GetDimension())


# ----------------------------------------------------------------------------- denoise
def _parse_views(text: str) -> Optional[int]:
    """``--views``: :func:`dualnet.orthoviews.parse_views`, its refusal as an argparse error."""
    from .errors import InputError
    from .orthoviews import parse_views

    try:
        return parse_views(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse_sigma(text: str):
    if text in (None, "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigma must be 'auto' or a number, got {text!r}")
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--sigma must be positive, got {text!r}")
    return value


def cmd_denoise(args) -> int:
    from .api import check_options, denoise_volume
    from .errors import InputError

    if args.dicom or args.send:
        return _denoise_dicom(args)
    inputs = [args.input] + _model_files(args.model)
    out = check_output_path(args.output, inputs[:1], args.force)
    unc = check_output_path(args.uncertainty, inputs, outputs=[out]) if args.uncertainty else None
    nmap = check_output_path(args.noise_map, inputs, outputs=[out, unc]) if args.noise_map else None
    conf = check_output_path(args.confidence, inputs, outputs=[out, unc, nmap]) if args.confidence else None
    extra = [p for p in (unc, nmap, conf) if p is not None]
    for path in extra:  # real-valued maps: a PNG would round them to whole numbers
        if path.name.lower().endswith(INTEGER_FORMATS):
            raise InputError(f"{path}: a map of real values cannot be written as {path.suffix} (whole numbers "
                             "only); use .nrrd, .nii.gz, .mha or .tif")
    neb_maps = nmap is not None or conf is not None
    info_json = (check_output_path(args.info_json, inputs, outputs=[out] + extra, formats=None)
                 if args.info_json else None)
    volume = _read_input(args.input, args.frame)
    for path in [out] + extra:
        check_output_format(path, volume.ndim)
    choice = choose_modality(args.modality, volume.array, volume.metadata)
    args.modality = choice.modality
    guard = False if args.no_guard else None
    check_options(volume.array, args.input, method=args.method, modality=args.modality, sigma=args.sigma,
                  tile=args.tile, uncertainty=bool(args.uncertainty), mc_samples=args.mc_samples, tta=args.tta,
                  guard=guard, views=args.views, neb_maps=neb_maps, precision=args.precision, model=args.model,
                  device=args.device)
    card = _verify_model(args.model, args.modality, args.device, bool(args.uncertainty), args.precision) \
        if args.method == "dualnet" else None
    if args.uncertainty and card is not None and float((card.get("architecture") or {}).get("dropout", 1.0)) == 0.0:
        raise InputError(f"--uncertainty: {args.model or 'the model'} has no dropout, so Monte-Carlo dropout gives "
                         "no spread (an all-zero map); use a DUAL-NET model")
    sigma_ignored = _warn_ignored_options(args, card, choice)
    sigma_source = "given" if args.sigma is not None else None
    if args.frame is not None and args.sigma is None and args.modality == "mri":
        args.sigma, sigma_source = _sigma_from_frames(args.input, args.frame)
    bar = ProgressPrinter(f"denoise ({args.method}, {args.modality})", _progress_mode(args))
    try:
        result = denoise_volume(
            volume,
            method=args.method,
            modality=args.modality,
            sigma=args.sigma,
            model=args.model,
            device=args.device,
            tta=args.tta,
            uncertainty=bool(args.uncertainty),
            mc_samples=args.mc_samples,
            tile=args.tile,
            seed=args.seed,
            progress=bar,
            guard=guard,
            views=args.views,
            neb_maps=neb_maps,
            precision=args.precision,
        )
    finally:
        bar.close()
    result.info.update(choice.info())
    if sigma_source is not None and "sigma" in result.info:
        result.info["sigma_source"] = sigma_source
    if sigma_ignored:  # the warning said so: the record must not say it was used
        result.info["sigma_ignored"] = True
    dtype = volume.array.dtype if args.dtype == "input" else np.float32
    written: List[Path] = []
    try:  # a cancel between the outputs leaves none of them (each is written atomically)
        written.append(write_volume(result.volume, out, inputs=inputs[:1], force=args.force, dtype=dtype))
        if unc is not None and result.uncertainty is not None:
            written.append(write_volume(result.uncertainty, unc, inputs=inputs, outputs=[out]))
        for path, vol in ((nmap, result.noise_map), (conf, result.confidence)):
            if path is not None and vol is not None:
                written.append(write_volume(vol, path, inputs=inputs, outputs=[out]))
        if info_json is not None:
            written.append(atomic_write_bytes(info_json, json.dumps(result.info, indent=2, default=str).encode("utf-8"),
                                              inputs=inputs, outputs=[out] + extra))
    except (KeyboardInterrupt, DualNetError):
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    _say_modality(args, choice)
    if sigma_source not in (None, "given") and "sigma" in result.info:
        _note(args, f"noise sigma {result.info['sigma']:.4g} from {sigma_source}")
    if result.info.get("inference_noise_warning"):
        _warn(result.info["inference_noise_warning"])
    _info(args, f"wrote {out} ({args.method}, {args.modality}, {result.info.get('seconds', 0):.1f} s)")
    return 0


def _verify_model(model: Optional[str], modality: str, device: str = "auto", mc: bool = False,
                  precision: str = "auto") -> dict:
    """Load the model once before any progress output, so a bad file fails with one clean line; its
    card. Loaded as the denoising will load it (:func:`dualnet.modelfile.load_for_inference`)."""
    from .api import resolve_model_path
    from .modelfile import load_for_inference

    return load_for_inference(resolve_model_path(model, modality), device, mc=mc, precision=precision)[1]


def _sigma_from_frames(path: str, frame: int) -> Tuple[Optional[float], Optional[str]]:
    """MRI noise sigma of a 4D series from the differences between its frames around ``frame``
    (:func:`dualnet.estimate.sigma_from_repeats`), and a phrase saying so; ``(None, None)`` for a
    single frame or identical frames (the noise is then estimated from the image itself)."""
    from .estimate import sigma_from_repeats
    from .io import read_frames

    frames = read_frames(path, frame)
    if frames.shape[0] < 2:
        return None, None
    sigma, _ = sigma_from_repeats(frames)
    if not np.isfinite(sigma) or sigma <= 0:  # identical frames (copies, not repeats)
        return None, None
    return sigma, f"the differences between {frames.shape[0]} consecutive frames (repeats)"


def _warn_ignored_options(args, card: Optional[dict], choice: Optional[ModalityChoice]) -> bool:
    """Warn about options that will not act as the user may think: --sigma with a model that has no
    noise-map input where no SURE guard runs either (nothing would use it), a --model whose card names
    another modality than the one chosen. True when --sigma is ignored."""
    arch = (card or {}).get("architecture") or {}
    ignored = False
    if args.sigma is not None and card is not None and not arch.get("noise_map") and choice is not None:
        from .sure_guard import unchecked_reason

        if args.no_guard or unchecked_reason(choice.modality, int(arch.get("dim", 2))) is not None:
            ignored = True
            _warn(f"--sigma: {args.model or 'the model'} has no noise-map input and no SURE guard runs here "
                  "(--no-guard, ultrasound or a 3D model), so nothing uses it (--sigma ignored)")
    trained = str((card or {}).get("modality") or "").lower()
    if args.model and choice is not None and trained and trained != choice.modality:
        _warn(f"{args.model}: the model's card says it was trained for {trained}, but the image is denoised "
              f"as {choice.modality} ({choice.reason}); the result may be poor: check --modality or --model")
    return ignored


def _model_files(model: Optional[str]) -> List[str]:
    """A ``--model`` file and its card beside it: inputs no output may overwrite."""
    if not model:
        return []
    from .modelfile import card_path

    return [str(model), str(card_path(model))]


def _denoise_dicom(args) -> int:
    """``denoise --dicom``: one derived DICOM series per source series; ``--send`` stores them."""
    from .dicom_out import path_inside
    from .errors import InputError
    from .io import atomic_write_bytes, same_path

    if not args.dicom:
        raise InputError("--send needs --dicom (only DICOM output can be sent)")
    if args.frame is not None:
        raise InputError("--frame does not apply to --dicom (every series and frame is written)")
    if args.noise_map or args.confidence:
        raise InputError("--noise-map / --confidence write image files: not with --dicom (denoise a series "
                         "into an image file to get them)")
    from .api import refuse_network_options

    refuse_network_options(args.method, model=args.model, tile=args.tile, device=args.device, tta=args.tta,
                           uncertainty=bool(args.uncertainty), guard=False if args.no_guard else None,
                           views=args.views, precision=args.precision)  # once here, not once per series
    node = None
    if args.send:
        from .dicom_send import parse_node

        node = parse_node(args.send)
    src = Path(args.input)
    info_inputs = [src if src.is_dir() else src.parent] + _model_files(args.model)  # the model's card too
    if args.info_json:
        info_path = Path(args.info_json)
        folders = [f for f in (args.output, args.uncertainty) if f]
        if any(same_path(info_path, f) or path_inside(info_path, f) for f in folders):
            raise InputError(f"{info_path}: --info-json must not be or lie in an output folder")
        check_output_path(info_path, info_inputs, formats=None)  # not an input, not in the input folder
    mode = _progress_mode(args)
    try:
        report = _denoise_dicom_series(args, mode)
    except (CancelledError, KeyboardInterrupt) as err:  # say what is kept; nothing is sent
        partial = getattr(err, "partial_report", None)
        done = [o for o in (partial.outcomes if partial is not None else []) if o.status == "ok"]
        if done:
            print(f"dualnet: cancelled; the {len(done)} series finished before are kept:", file=sys.stderr)
            for line in partial.summary_lines(failed=False)[:len(done)]:
                print(f"  {line}", file=sys.stderr)
            return 130
        raise
    for line in report.summary_lines(failed=False):
        _info(args, line)
    for o in report.outcomes:
        if o.status == "ok" and (o.info or {}).get("inference_noise_warning"):
            _warn(f"{o.source.folder}: {o.info['inference_noise_warning']}")
    if args.info_json:
        atomic_write_bytes(args.info_json, json.dumps(report.to_json(), indent=2, default=str).encode("utf-8"),
                           inputs=info_inputs)
    failed = [o for o in report.outcomes if o.status != "ok"]
    for o in failed:
        print(f"dualnet: error: {o.source.folder}: {o.error}", file=sys.stderr)
    code = 2 if failed else 0
    if node is not None:
        from .dicom_send import SendError, send_files

        files = report.written_files
        try:
            statuses = send_files(files, node)
        except SendError as err:
            print(f"dualnet: error: {err}", file=sys.stderr)
            return 3
        for st in statuses:
            print(st.line())
        bad = sum(not st.stored for st in statuses)
        print(f"sent {len(statuses) - bad}/{len(statuses)} instances to {node}"
              + (f"; {bad} failed, files kept on disk" if bad else ""))
        if bad:
            return 3
    return code


def _denoise_dicom_series(args, mode: str):
    """:func:`dualnet.dicom_out.denoise_dicom_folder` with the command's options."""
    from .dicom_out import denoise_dicom_folder

    return denoise_dicom_folder(
        args.input, args.output, method=args.method, modality=args.modality, sigma=args.sigma, model=args.model,
        device=args.device, tta=args.tta, mc_samples=args.mc_samples, tile=args.tile, seed=args.seed,
        guard=False if args.no_guard else None, views=args.views, uncertainty_dir=args.uncertainty,
        precision=args.precision,
        progress_factory=lambda s: ProgressPrinter(f"denoise ({args.method}) series {s.series_number}", mode),
    )


# ----------------------------------------------------------------------------- degrade
def _parse_triplet(text: str) -> tuple:
    try:
        parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2, 3) or not all(np.isfinite(p) and p >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected finite factors >= 1 like '2,1,1' (z,y,x), got {text!r}")
    return tuple(parts)


def cmd_degrade(args) -> int:
    from .degrade import degrade_volume
    from .noise import DEFAULT_LEVELS

    out = check_output_path(args.output, [args.clean], args.force)
    lr_out = check_output_path(args.clean_lr, [args.clean], outputs=[out]) if args.clean_lr else None
    volume = _read_input(args.clean, args.frame)
    for path in (out, lr_out):
        if path is not None:
            check_output_format(path, volume.ndim)
    level = DEFAULT_LEVELS[args.modality] if args.level is None else args.level
    noisy, clean_lr = degrade_volume(
        volume, args.modality, level, lr_factor=args.lr_factor, anisotropy=args.anisotropy, seed=args.seed
    )
    noisy, clipped = _as_bmode_bytes(noisy, out, args.modality)
    write_volume(noisy, out, inputs=[args.clean], force=args.force)
    if lr_out is not None:
        clean_lr, _ = _as_bmode_bytes(clean_lr, lr_out, args.modality)
        write_volume(clean_lr, lr_out, inputs=[args.clean], outputs=[out])
    _info(args, f"wrote {out}: {args.modality} level {level}, low-resolution factor {args.lr_factor}, "
                f"spacing {tuple(round(s, 3) for s in noisy.spacing)} mm (x, y, z)")
    if clipped:
        _warn(f"{out}: {100 * clipped:.2g} % of the pixels were above 255 and saturate at 255 in the 8-bit PNG "
              "(as on a scanner's display); write .nrrd or .mha to keep the speckle unclipped")
    return 0


def _as_bmode_bytes(volume, path: Path, modality: str):
    """An ultrasound volume going into a whole-number format (PNG) as 8-bit grey levels (rounded,
    clipped to 0..255), the format of a B-mode frame, so that it reads back as ultrasound; and the
    fraction of voxels clipped above 255. Anything else unchanged (fraction 0). A 16-bit PNG of
    speckle (values above 255) would be taken for MRI by the modality guess."""
    if modality != "us" or not path.name.lower().endswith(INTEGER_FORMATS):
        return volume, 0.0
    clipped = float(np.mean(volume.array > 255.5))
    return volume.with_array(cast_like(volume.array, np.uint8)), clipped


# ----------------------------------------------------------------------------- dice
def cmd_dice(args) -> int:
    from .errors import InputError
    from .metrics import dice_per_label

    out = check_output_path(args.csv, [args.a, args.b], formats=None) if args.csv else None
    for name in (args.a, args.b):
        _refuse_colour(name)
    a = read_volume(args.a, check_finite=False)
    b = read_volume(args.b, check_finite=False)
    for vol, name in ((a, args.a), (b, args.b)):
        _check_label_map(vol, name, chosen=args.labels is not None)
    try:
        scores = dice_per_label(a, b, labels=args.labels)
    except InputError as err:
        raise InputError(f"{args.a} vs {args.b}: {err}") from None
    present = set(np.unique(a.array).tolist()) | set(np.unique(b.array).tolist())
    rows = [(int(k), float(v) if k in present else None) for k, v in sorted(scores.items())]
    for label, value in rows:
        print(f"label {label}: Dice {value:.4f}" if value is not None
              else f"label {label}: absent from both maps (Dice undefined)")
    if out is not None:
        buf = StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["label", "dice"])
        writer.writerows((label, "" if value is None else value) for label, value in rows)
        atomic_write_bytes(out, buf.getvalue().encode("utf-8"), inputs=[args.a, args.b])
    return 0


#: More distinct labels than this suggests an intensity image rather than a label map (a warning).
MAX_LABELS = 255


def _refuse_colour(path: str) -> None:
    """A colour image is not a label map (reading it would turn its colours into grey levels)."""
    from .errors import InputError

    reader = _image_header(path)
    if reader is not None and reader.GetNumberOfComponents() > 1:
        raise InputError(f"{path}: a colour image ({reader.GetNumberOfComponents()} channels), not a label map; "
                         "give a one-channel image of integer labels")


def _check_label_map(vol, name: str, chosen: bool) -> None:
    """Refuse non-integer images; warn, unless labels were chosen, about implausibly many labels."""
    from .errors import InputError

    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise InputError(f"{name}: not a label map (non-integer or NaN values); give integer label images")
    if not chosen:
        count = len(np.unique(arr)) - 1
        if count > MAX_LABELS:
            print(f"dualnet: warning: {name}: {count:,} non-zero labels; is this an intensity image rather than "
                  f"a label map? (--labels scores chosen labels only)", file=sys.stderr)


def _parse_labels(text: str) -> List[int]:
    """``--labels 1,2,5`` -> [1, 2, 5]."""
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer labels like 1,2,5, got {text!r}")
    if not labels:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer labels like 1,2,5, got {text!r}")
    return labels


# ----------------------------------------------------------------------------- estimate
def cmd_estimate(args) -> int:
    from .errors import InputError
    from .estimate import estimate_noise

    volume = _read_input(args.input, args.frame, irregular_ok=True)  # writes no image: slice positions do not matter
    choice = choose_modality(args.modality, volume.array, volume.metadata)
    args.modality = choice.modality
    try:
        est = estimate_noise(volume.array.astype(np.float32), args.modality)
    except InputError as err:
        raise InputError(f"{args.input}: {err}") from None
    _say_modality(args, choice)
    fields = est.__dict__ if hasattr(est, "__dict__") else {"sigma": float(est)}
    fields = {**fields, **choice.info()}
    if args.frame is not None and args.modality == "mri":  # what `denoise --frame` uses
        sigma, source = _sigma_from_frames(args.input, args.frame)
        if sigma is not None:
            fields.update(sigma_from_frames=sigma, sigma_from_frames_source=source)
    result, undefined = _json_safe(fields)
    if undefined:
        result["undefined"] = undefined
        result["note"] = (f"{', '.join(undefined)} undefined for this image as {args.modality}: the {args.modality} "
                          "noise model does not fit it (is --modality right?)")
    print(json.dumps(result, allow_nan=False))
    return 0


def _json_safe(fields: dict, prefix: str = ""):
    """``(fields with non-finite numbers as null, the dotted names of those fields)``: valid JSON."""
    out, undefined = {}, []
    for key, value in fields.items():
        if isinstance(value, dict):
            out[key], more = _json_safe(value, f"{prefix}{key}.")
            undefined += more
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            value = float(value)
            out[key] = value if np.isfinite(value) else None
            if out[key] is None:
                undefined.append(prefix + key)
        else:
            out[key] = value
    return out, undefined


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(Path(args.out), methods=args.methods, level=args.level, progress_mode=_progress_mode(args))
    print(report)
    return 0


# ----------------------------------------------------------------------------- parser
def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (:mod:`dualnet.precision`), as ``dualnet denoise`` and the batch script take it."""
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                        help="network arithmetic on the CPU: auto (default) = bf16 where the CPU has AMX bf16 tiles, "
                             "with the layers that read or write intensities (or those the model card names) in fp32 "
                             "(within 0.02 dB on the validation cases, 1.2-1.4x faster), else float32; "
                             "float32 = full precision everywhere; bfloat16 = bf16 on any CPU")


def add_tta_options(parser: argparse.ArgumentParser) -> None:
    """``--tta`` / ``--no-tta`` / ``--tta-passes N`` (mutually exclusive) into ``args.tta``: 8, 1, N,
    or None for the model's default. Shared by ``dualnet denoise`` and ``scripts/batch_denoise.py``."""
    from .inference import TTA_CHOICES  # numpy only; the denoise command imports it anyway

    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_const", const=8, default=None,
                     help="network: average the results of 8 flips / quarter turns of the input (about 8x the "
                          "network's time). Default: the model's where one view runs (the shipped ultrasound and CT "
                          "models average the 4 quarter turns, MRI none), none with three views")
    tta.add_argument("--no-tta", dest="tta", action="store_const", const=1,
                     help="network: no test-time augmentation, whatever the model's default")
    tta.add_argument("--tta-passes", dest="tta", type=int, choices=TTA_CHOICES,
                     help="network: the number of test-time transforms averaged: 1 (none, as --no-tta), 4 (the "
                          "quarter turns) or 8 (and their mirror images, as --tta)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dualnet",
        description="Denoise low-resolution MRI, CT and ultrasound volumes with DUAL-NET or classical baselines. "
        "Volumes are read and written with SimpleITK (NRRD, NIfTI, MHA, DICOM folders, PNG) keeping "
        "spacing (mm), origin (mm, LPS) and direction.",
    )
    parser.add_argument("--version", action="version", version=f"dualnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, progress_json: bool = True):
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
        if progress_json:
            p.add_argument("--progress-json", action="store_true",
                           help="print machine-readable 'DUALNET_PROGRESS {json}' lines instead of a bar")

    p = sub.add_parser("denoise", help="denoise a volume or 2D image",
                       description="Denoise INPUT and write OUTPUT on the same grid (float32 by default).")
    p.add_argument("input", help="input image: NRRD, NIfTI, MHA, PNG file or a DICOM series folder")
    p.add_argument("output", help="output file (.nrrd, .nii.gz, .mha, .png ...); never the input; "
                                  "with --dicom a new or empty folder")
    p.add_argument("--method", default="dualnet",
                   help="dualnet (default, shipped model for the modality) or a classical baseline: "
                        "bm4d, bm3d (slice-wise), nlm, gaussian, median, diffusion")
    p.add_argument("--modality", default=AUTO, choices=MODALITY_CHOICES, help=MODALITY_HELP)
    p.add_argument("--model", help="DUAL-NET model file (.safetensors with its .json card); default: shipped model")
    p.add_argument("--sigma", type=_parse_sigma, default=None,
                   help=f"the noise level: {SIGMA_MEANING}; or 'auto' (default: estimated; for a 4D MRI with "
                        "--frame, from the differences between its frames). The classical methods and the network "
                        "(its noise map and SURE guard) use it alike")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="network device; auto = CUDA, then MPS, then CPU")
    add_precision_option(p)
    p.add_argument("--uncertainty", metavar="PATH",
                   help="also write the Monte Carlo dropout standard deviation map (image units; a model with dropout; scaled by the SURE guard's blend weight; not as PNG, which holds whole numbers)")
    p.add_argument("--noise-map", metavar="PATH",
                   help="network: also write its noise branch's per-voxel noise standard deviation (image units; not as PNG)")
    p.add_argument("--confidence", metavar="PATH",
                   help="network: also write its noise branch's confidence map (0..1: how close its blind-spot "
                        "estimate is expected to be to the noise-free image; meaningful for models trained with "
                        "lambda_alpha > 0, see the model card; not as PNG)")
    p.add_argument("--mc-samples", type=_count(2), default=8,
                   help="dropout passes for --uncertainty, at least 2 (default 8)")
    add_tta_options(p)
    p.add_argument("--no-guard", action="store_true",
                   help="network: hand back its result as it is. By default (MRI, CT) one more pass over a "
                        "quarter of the slices (4 runs spread over the volume) estimates the error by SURE and "
                        "blends the result with the input where that lowers it (never worse than the input, by "
                        "that estimate)")
    p.add_argument("--views", type=_parse_views, default=None, metavar="{auto,1,3}",
                   help="network: slice orientations it runs along, averaged: 1 (z) or 3 (z, y and x; +0.3 to "
                        "+1.3 dB on the 2 mm MRI and 6 mm CT validation volumes, three times the time); auto "
                        "(default) = 3 for the shipped MRI and CT models on near-isotropic volumes (voxel sizes "
                        "within 1.5:1, at least 12 voxels per axis), else 1; with 3, the shipped MRI model's "
                        "card then smooths the mean where the views disagree (view_smoothing)")
    p.add_argument("--tile", type=_count(16),
                   help="sliding-window tile edge in voxels, at least 16 (default: from free memory)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the dropout passes, 0..2^32-1 (default 0)")
    p.add_argument("--dtype", choices=["float32", "input"], default="float32",
                   help="output pixel type: float32 (default) or the input's type (rounded and clipped)")
    p.add_argument("--frame", type=_count(0),
                   help="for a 4D input, the volume index (0-based) to denoise (refused for a 2D or 3D input)")
    p.add_argument("--force", action="store_true", help="allow OUTPUT to be the same file as INPUT")
    p.add_argument("--info-json", metavar="PATH", help="write the run's provenance (method, model, seconds) as JSON")
    p.add_argument("--dicom", action="store_true",
                   help="INPUT is a DICOM folder or file (nested folders and several series allowed); write each "
                        "result as a new derived DICOM series (same patient and study, DERIVED\\SECONDARY, "
                        "provenance) into the folder OUTPUT (one subfolder per series when there are several); "
                        "--uncertainty PATH is then a folder too")
    p.add_argument("--send", metavar="AET@HOST:PORT",
                   help="with --dicom: store the written series on this DICOM node (C-STORE); one status line per "
                        "instance, exit 3 if the node is unreachable or any instance fails (files are kept)")
    common(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("degrade", help="simulate a low-resolution noisy acquisition of a clean volume",
                       description="Blur (anti-alias), downsample by --lr-factor and add modality noise.")
    p.add_argument("clean", help="clean input volume")
    p.add_argument("output", help="noisy low-resolution output volume")
    p.add_argument("--modality", required=True, choices=["mri", "ct", "us"],
                   help="noise to add: mri = Rician, ct = Poisson-Gaussian low dose (HU), us = Gamma speckle")
    p.add_argument("--level", type=_positive_float, help=LEVEL_HELP + " (default: 0.05 / 0.25 / 4)")
    p.add_argument("--lr-factor", type=_count(1), default=2,
                   help="downsampling factor of the low-resolution grid (default 2; 1 = noise only)")
    p.add_argument("--anisotropy", type=_parse_triplet, default=(1.0, 1.0, 1.0),
                   help="extra per-axis factors z,y,x multiplied into --lr-factor, e.g. 2,1,1 for thick slices")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the noise, 0..2^32-1 (default 0)")
    p.add_argument("--clean-lr", metavar="PATH", help="also write the clean low-resolution reference")
    p.add_argument("--frame", type=_count(0), help="for a 4D input, the volume index (0-based)")
    p.add_argument("--force", action="store_true", help="allow OUTPUT to be the same file as CLEAN")
    common(p, progress_json=False)
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("dice", help="per-label Dice between two label maps on the same grid (one-channel integer images; colour masks are refused)")
    p.add_argument("a", help="reference label map")
    p.add_argument("b", help="test label map (same shape, spacing, origin and direction)")
    p.add_argument("--labels", type=_parse_labels,
                   help="comma-separated integer labels, e.g. 1,2,5 (default: all non-zero labels in either map)")
    p.add_argument("--csv", metavar="PATH", help="also write label,dice rows to this CSV file (never an input)")
    p.set_defaults(func=cmd_dice)

    p = sub.add_parser("estimate", help="estimate the noise level of a volume (JSON)")
    p.add_argument("input", help="noisy image: NRRD, NIfTI, MHA, PNG file or a DICOM series folder")
    p.add_argument("--modality", default=AUTO, choices=MODALITY_CHOICES,
                   help="noise model to fit: auto (default) = from the DICOM Modality tag, else from the "
                        "intensities, said on stderr; mri = Rician sigma, ct = Poisson-Gaussian (HU) as a dose "
                        "fraction, us = speckle looks")
    p.add_argument("--frame", type=_count(0), help="for a 4D input, the volume index (0-based)")
    common(p, progress_json=False)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("demo", help="degrade the bundled sample scan, denoise it, write results and a PNG")
    p.add_argument("--out", default="out/demo", help="output folder (created)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: dualnet if a shipped model exists, and bm4d)")
    p.add_argument("--level", type=_positive_float, default=0.05,
                   help="Rician sigma as a fraction of the maximum (default 0.05)")
    common(p, progress_json=False)
    p.set_defaults(func=cmd_demo)

    _add_optional_parsers(sub)
    return parser


def _add_optional_parsers(sub) -> None:
    """Sub-commands that live in their own modules (training, evaluation).

    When such a module cannot be imported (e.g. ``tomli`` missing on Python < 3.11), its commands
    stay listed and fail with one line naming the missing package, never ``invalid choice``.
    """
    try:
        from .training.cli import add_train_parsers

        add_train_parsers(sub)
    except ImportError as err:
        _add_unavailable(sub, ("train", "finetune"), err)
    try:
        from .evaluate import add_evaluate_parser

        add_evaluate_parser(sub)
    except ImportError as err:
        _add_unavailable(sub, ("evaluate",), err)


def _add_unavailable(sub, names: Sequence[str], err: ImportError) -> None:
    """Placeholder sub-commands that accept any arguments and say, in one line, why they cannot run."""
    missing = getattr(err, "name", None)
    reason = f"needs the Python package '{missing}'" if missing else "cannot be loaded"
    hint = " (Python < 3.11: pip install tomli)" if missing == "tomli" else ""

    def fail(args) -> int:
        print(f"dualnet: error: '{args.command}' {reason}{hint}: {err}", file=sys.stderr)
        return 2

    for name in (n for n in names if n not in sub.choices):
        p = sub.add_parser(name, help=f"unavailable: {reason}", add_help=False, prefix_chars="\0")
        p.add_argument("ignored", nargs="*")
        p.set_defaults(func=fail)


class _sigterm_as_interrupt:
    """While a command runs, SIGTERM stops it like Ctrl-C: temporaries removed, exit 130 (main thread only)."""

    def __enter__(self) -> "_sigterm_as_interrupt":
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._handler)
        except (ValueError, OSError, AttributeError):  # not the main thread / no SIGTERM
            pass
        return self

    @staticmethod
    def _handler(signum, frame) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except (CancelledError, KeyboardInterrupt):
        print("dualnet: cancelled; no output written", file=sys.stderr)
        return 130
    except DualNetError as err:
        print(f"dualnet: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system problem not caught closer to its cause
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"dualnet: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except MemoryError:
        print("dualnet: error: out of memory; try a smaller --tile or another --device", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
