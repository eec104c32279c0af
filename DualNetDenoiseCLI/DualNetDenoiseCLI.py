#!/usr/bin/env python-real
"""Slicer CLI module: DUAL-NET denoising of one volume (see DualNetDenoiseCLI.xml).

The command line is parsed from the XML beside this file, exactly as Slicer builds it:
``[--modality auto] [--sigma 0] [--model FILE] [--device auto] [--tta auto|off|x4|x8] [--noGuard] [--views auto|1|3] [--uncertaintyVolume FILE]
[--noiseMapVolume FILE] [--confidenceVolume FILE] INPUT OUTPUT``.
``auto`` (the default) takes the modality from the DICOM Modality tag, else from the intensities
(``dualnet.modality.choose_modality``); the choice and its reason are printed on stdout. ``--sigma 0``
estimates the noise level from the image (``dualnet denoise --sigma`` for what a given one means).
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
    """Denoise INPUT into OUTPUT with DUAL-NET, optionally writing the MC-dropout std map and the
    noise branch's noise-std and confidence maps."""
    from dualnet import api
    from DualNetDenoiseLib.cliargs import check_output_volume
    from dualnet.io import check_output_path, read_volume, write_volume
    from dualnet.inference import parse_tta
    from dualnet.orthoviews import parse_views

    inputs = [args.inputVolume]
    extras = [(args.uncertaintyVolume, "uncertainty"), (args.noiseMapVolume, "noise_map"),
              (args.confidenceVolume, "confidence")]
    written = [check_output_volume(args.outputVolume, args.inputVolume)]
    for path, _ in extras:
        if path:
            written.append(check_output_path(path, inputs, outputs=written))
    volume = read_volume(args.inputVolume)
    result = api.denoise_volume(
        volume, method="dualnet", modality=args.modality, sigma=args.sigma if args.sigma > 0 else None,
        model=args.model or None, device=args.device,
        tta=parse_tta(args.tta), uncertainty=bool(args.uncertaintyVolume), progress=progress,
        guard=False if args.noGuard else None, views=parse_views(args.views),
        neb_maps=bool(args.noiseMapVolume or args.confidenceVolume))
    print(f"DualNetDenoiseCLI: modality {result.info.get('modality')} ({result.info.get('modality_reason', '')})",
          flush=True)  # stdout: Slicer reports any stderr output as an error
    for line in api.result_warnings(result.info):
        print(f"DualNetDenoiseCLI: warning: {line}", flush=True)
    write_volume(result.volume, args.outputVolume, inputs=inputs)
    for path, key in extras:
        if path and getattr(result, key) is not None:
            write_volume(getattr(result, key), path, inputs=inputs, outputs=[args.outputVolume])


def main(argv=None) -> int:
    from DualNetDenoiseLib.cliargs import parse_cli_args, run_cli_module

    args = parse_cli_args(XML, argv, prog="DualNetDenoiseCLI")
    return run_cli_module(args, "DualNetDenoiseCLI", "DualNet denoise", denoise,
                          comment=f"DUAL-NET on {os.path.basename(args.inputVolume)}")


if __name__ == "__main__":
    sys.exit(main())
