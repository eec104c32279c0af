"""``dualnet train`` / ``dualnet finetune`` sub-commands (also ``python -m dualnet.training.cli``).

Exit codes: 0 success, 2 bad input / model / config, 130 cancelled (Ctrl-C, SIGTERM); the
message of a cancelled run names the checkpoint to ``--resume`` from.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from ..cli import SIGMA_MEANING, _count, _parse_sigma, _seed, _sigma_from_frames  # shared with the other sub-commands
from ..errors import CancelledError, DualNetError


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def add_train_parsers(subparsers) -> None:
    """Add ``train`` and ``finetune`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("train", help="supervised pretraining on synthetic degradations of clean scans",
                              description="Train DUAL-NET (or the DnCNN / Noise2Void baselines) from a TOML config.")
    p.add_argument("--config", required=True,
                   help="TOML config file, or the name of a shipped one: pretrain_mri | pretrain_ct | pretrain_us "
                        "(also just mri | ct | us)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--steps", type=_count(1), default=None, help="override the number of optimiser steps")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (default: the config's)")
    p.add_argument("--data-dir", default=None, help="base folder of relative data paths "
                   "(default: config data_dir, $DUALNET_SHARED_DATA or ../shared/data)")
    p.add_argument("--workers", type=_count(0), default=None,
                   help="data-generation worker processes (0 = in the training process; default: the config's)")
    p.add_argument("--batch-size", type=_count(1), default=None,
                   help="patches per optimiser step (default: the config's)")
    p.add_argument("--export", default=None, help="also write the final model here (.safetensors + card), e.g. "
                   "DualNetDenoise/dualnet/weights/dualnet_mri.safetensors for a shipped model")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget: the run and its cosine schedule are shortened to fit (0 = off)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="random seed of patches, noise and dropout, 0..2^32-1 (default: the config's)")
    p.add_argument("--progress-json", action="store_true", help="print DUALNET_PROGRESS {json} lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train_main)

    f = subparsers.add_parser("finetune", help="self-supervised fine-tuning on real noisy scans",
                              description="Self-supervised fine-tuning of a trained model on real noisy scans, "
                                          "no clean data: SURE with the noise model estimated from the scans "
                                          "(default, configs/finetune.toml), or Noise2Void masking "
                                          "(ss_loss = \"l2\" in a --config TOML).")
    f.add_argument("inputs", nargs="+", metavar="INPUT", help="noisy scans (files, DICOM folders, PNG frame folders)")
    f.add_argument("--model", required=True, help="base model (.safetensors with its JSON card)")
    f.add_argument("--out", required=True,
                   help="fine-tuned model (.safetensors, card beside it); never the base model or an input")
    f.add_argument("--config", default=None, help="TOML config (default: dualnet/configs/finetune.toml)")
    f.add_argument("--steps", type=_count(1), default=None, help="override the number of optimiser steps")
    f.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (default: the config's)")
    f.add_argument("--frame", type=_count(0), default=None, help="4D inputs: volume index along the 4th axis")
    f.add_argument("--sigma", type=_parse_sigma, default=None,
                   help=f"the inputs' noise level, as `dualnet denoise --sigma`: {SIGMA_MEANING}; or 'auto' "
                        "(default): for one 4D MRI input with --frame from the differences between the frames, "
                        "else estimated from each scan. SURE keeps what is above this noise, so a wrong sigma "
                        "is learnt")
    f.add_argument("--base-check", type=_count(0), default=None, metavar="N",
                   help="after fine-tuning, keep the model only if SURE over up to N whole scans says it beats "
                        "the base, else write the base (default: the config's, 2; 0 = no check)")
    f.add_argument("--run-dir", default=None, help="folder for checkpoint/log (default <out stem>_run)")
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint in the run folder")
    f.add_argument("--progress-json", action="store_true", help="print DUALNET_PROGRESS {json} lines")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=finetune_main)


def resolve_config(name: str) -> Path:
    """A config path: an existing file, else a shipped config by name (``mri`` -> pretrain_mri.toml)."""
    from .config import config_dir

    p = Path(name)
    if p.exists():
        return p
    for cand in (config_dir() / name, config_dir() / f"{name}.toml", config_dir() / f"pretrain_{name}.toml"):
        if cand.is_file():
            return cand
    return p  # load_config reports the missing file


def _reporting(args: argparse.Namespace):
    """``(show_bar, progress)``: a tqdm bar on a terminal, else plain progress lines, unless
    ``--quiet`` or ``--progress-json`` (which prints its own lines)."""
    if args.progress_json or args.quiet:
        return False, None
    bar = sys.stderr.isatty()
    return bar, None if bar else _line_progress()


def _guarded(what: str, job: Callable[[], Any]) -> Tuple[Any, int]:
    """Run ``job``; ``(result, 0)``, or ``(None, exit code)`` with the message printed:
    130 when cancelled or interrupted, 2 on bad input / model / config."""
    try:
        return job(), 0
    except CancelledError as err:
        print(f"dualnet: {err}", file=sys.stderr, flush=True)
        return None, 130
    except KeyboardInterrupt:
        print(f"dualnet: {what} interrupted", file=sys.stderr)
        return None, 130
    except DualNetError as err:
        print(f"dualnet: error: {err}", file=sys.stderr)
        return None, 2


def train_main(args: argparse.Namespace) -> int:
    """Run ``dualnet train``; returns the exit code."""
    from .config import load_config
    from .trainer import pretrain

    def job():
        config_path = resolve_config(args.config)
        cfg = load_config(config_path, steps=args.steps, device=args.device,
                          num_workers=getattr(args, "workers", None), batch_size=getattr(args, "batch_size", None),
                          time_budget_s=getattr(args, "time_budget", None), seed=getattr(args, "seed", None))
        out = Path(args.out) if args.out else Path("runs") / config_path.stem
        bar, progress = _reporting(args)
        return pretrain(cfg, out_dir=out, resume=bool(args.resume), data_dir=getattr(args, "data_dir", None),
                        progress_json=bool(args.progress_json), show_bar=bar, command=_command_line(),
                        export_path=getattr(args, "export", None), progress=progress)

    res, code = _guarded("training", job)
    if res is not None and res.model_path is not None:
        print(f"trained {res.steps} steps in {res.seconds:.0f} s; loss {res.first_loss:.4g} -> {res.last_loss:.4g}; "
              f"val PSNR {res.val_psnr if res.val_psnr is None else round(res.val_psnr, 2)} dB, "
              f"SSIM {res.val_ssim if res.val_ssim is None else round(res.val_ssim, 4)}; model {res.model_path}",
              file=sys.stderr if args.progress_json else sys.stdout, flush=True)
    return code


def finetune_main(args: argparse.Namespace) -> int:
    """Run ``dualnet finetune``; returns the exit code."""
    from .config import config_dir, load_config
    from .trainer import finetune

    def job():
        cfg = load_config(resolve_config(args.config) if args.config else config_dir() / "finetune.toml",
                          steps=args.steps, device=args.device, base_check=args.base_check)
        bar, progress = _reporting(args)
        return finetune(list(args.inputs), args.model, args.out, cfg, resume=bool(args.resume),
                        out_dir=args.run_dir, progress_json=bool(args.progress_json), show_bar=bar,
                        command=_command_line(), frame=args.frame, progress=progress,
                        sigma=_finetune_sigma(args))

    res, code = _guarded("fine-tuning", job)
    if res is not None and res.model_path is not None:
        kept = "the base model (the fine-tuned one was not better on the whole scan)" if res.kept_base else "model"
        print(f"fine-tuned {res.steps} steps in {res.seconds:.0f} s; self-supervised val loss "
              f"{res.val_loss}; {kept} {res.model_path}", file=sys.stderr if args.progress_json else sys.stdout)
    return code


def _finetune_sigma(args: argparse.Namespace) -> Optional[float]:
    """``--sigma``: a number; with 'auto', the frames' sigma of one 4D MRI input with ``--frame`` (as
    ``dualnet denoise --frame`` takes it), else None (each scan's own estimate)."""
    from ..modelfile import read_card

    sigma = args.sigma  # a number, or None for 'auto' (parsed as `dualnet denoise --sigma` is)
    if (sigma is None and args.frame is not None and len(args.inputs) == 1
            and read_card(args.model).get("modality") == "mri"):
        sigma, source = _sigma_from_frames(args.inputs[0], args.frame)
        if sigma is not None:
            print(f"noise sigma {sigma:.4g} from {source}", file=sys.stderr)
    return sigma


def _line_progress():
    """Plain progress lines (non-tty): at most one per call, on stdout."""
    def fn(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", flush=True)

    return fn


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m dualnet.training.cli train|finetune ...``."""
    parser = argparse.ArgumentParser(prog="dualnet-train", description="DualNet training")
    sub = parser.add_subparsers(dest="command")
    add_train_parsers(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
