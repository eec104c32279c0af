#!/usr/bin/env python-real
"""Slicer CLI module: per-label Dice of two label maps, written as a CSV table.

Command line (parsed from DiceAssessmentCLI.xml):
``[--outputTable dice.csv] [--labels 1,2] [--returnparameterfile FILE] LABEL_A LABEL_B``.
The mean Dice goes to Slicer's return-parameter file (output parameter ``meanDice``).
"""

import os
import sys

def _core_candidates(here):
    """Folders that may hold ``dualnet``: source checkout, installed extension, and multi-configuration
    build trees, where Slicer puts CLIs in ``cli-modules/<CONFIG>/`` (Visual Studio, Xcode)."""
    config = os.path.basename(here)
    for base in (here, os.path.dirname(here)):
        yield os.path.join(base, os.pardir, "DualNetDenoise")  # source checkout
        yield os.path.join(base, os.pardir, "qt-scripted-modules")  # installed extension / build tree
        yield os.path.join(base, os.pardir, "qt-scripted-modules", config)
    yield here


def _add_core_to_path():
    """Make ``dualnet`` and ``DualNetDenoiseLib`` importable."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in map(os.path.normpath, _core_candidates(here)):
        if os.path.isdir(os.path.join(candidate, "dualnet")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return


_add_core_to_path()
XML = os.path.splitext(os.path.abspath(__file__))[0] + ".xml"


def assess(args, progress) -> None:
    """Per-label Dice of LABEL_A vs LABEL_B: CSV table, stdout, and meanDice for Slicer."""
    from DualNetDenoiseLib.cliargs import write_return_parameters
    from dualnet.errors import InputError
    from dualnet.io import atomic_write_bytes, read_volume
    from dualnet.metrics import dice_per_label

    labels = None
    if args.labels and args.labels.strip():
        try:
            labels = [int(x) for x in args.labels.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    a = read_volume(args.labelA)
    progress(0.3)
    b = read_volume(args.labelB)
    progress(0.6)
    dice = dice_per_label(a, b, labels=labels)
    rows = ["label,dice,voxels_a,voxels_b"]
    for lab in sorted(dice):
        rows.append(f"{lab},{dice[lab]:.6f},{int((a.array == lab).sum())},{int((b.array == lab).sum())}")
    mean = sum(dice.values()) / len(dice) if dice else float("nan")
    if args.outputTable:
        atomic_write_bytes(args.outputTable, ("\n".join(rows) + "\n").encode("utf-8"),
                           inputs=[args.labelA, args.labelB])
    print("\n".join(rows), flush=True)
    write_return_parameters(args.returnparameterfile, {"meanDice": f"{mean:.6f}"})


def main(argv=None) -> int:
    from DualNetDenoiseLib.cliargs import parse_cli_args, run_cli_module

    args = parse_cli_args(XML, argv, prog="DiceAssessmentCLI")
    return run_cli_module(args, "DiceAssessmentCLI", "Dice assessment", assess, comment="per-label Dice")


if __name__ == "__main__":
    sys.exit(main())
