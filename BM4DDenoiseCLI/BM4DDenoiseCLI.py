#!/usr/bin/env python-real
"""Slicer CLI module: BM4D baseline with the modality's variance-stabilising transform.

Command line (parsed from BM4DDenoiseCLI.xml): ``[--modality auto] [--sigma 0] INPUT OUTPUT``;
sigma 0 means "estimate from the image". bm4d (non-commercial licence) is imported lazily by
the core, which says so clearly when it is missing.
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


def denoise(args, progress) -> None:
    """Denoise INPUT into OUTPUT with BM4D and the modality's transform (never over the input)."""
    from dualnet import api
    from DualNetDenoiseLib.cliargs import check_output_volume
    from dualnet.io import read_volume, write_volume

    check_output_volume(args.outputVolume, args.inputVolume)
    volume = read_volume(args.inputVolume)
    result = api.denoise_volume(volume, method="bm4d", modality=args.modality,
                                sigma=args.sigma if args.sigma > 0 else None, progress=progress)
    print(f"BM4DDenoiseCLI: modality {result.info.get('modality')} ({result.info.get('modality_reason', '')})",
          flush=True)  # stdout: Slicer reports any stderr output as an error
    write_volume(result.volume, args.outputVolume, inputs=[args.inputVolume])


def main(argv=None) -> int:
    from DualNetDenoiseLib.cliargs import parse_cli_args, run_cli_module

    args = parse_cli_args(XML, argv, prog="BM4DDenoiseCLI")
    return run_cli_module(args, "BM4DDenoiseCLI", "BM4D denoise", denoise,
                          comment=f"BM4D on {os.path.basename(args.inputVolume)}")


if __name__ == "__main__":
    sys.exit(main())
