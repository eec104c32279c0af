"""Child-process script: ``PythonSlicer worker.py JOB.json``.

The JSON job names an input volume file, the output file(s) and the denoising parameters::

    {"input": "in.nrrd", "output": "out.nrrd", "uncertainty_output": "unc.nrrd" | null,
     "noise_map_output": "sigma.nrrd" | null, "confidence_output": "alpha.nrrd" | null,
     "info_output": "info.json", "method": "dualnet", "modality": "mri", "sigma": null,
     "model": null, "device": "auto", "tta": null, "uncertainty": false, "views": null,
     "neb_maps": false}

It prints ``DUALNET_PROGRESS {json}`` lines while working, ``DUALNET_ERROR <line>`` on a
user-facing error (exit code 2), and writes the outputs atomically through ``dualnet.io``.
:func:`run_denoise` is also what the Slicer logic calls in-process, so both paths share it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

_MODULE_DIR = Path(__file__).resolve().parents[1]  # .../DualNetDenoise, which holds dualnet/
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

PROGRESS_PREFIX = "DUALNET_PROGRESS"
ERROR_PREFIX = "DUALNET_ERROR"

#: Parameters of a denoising run and their defaults (the keys of a job besides file paths).
DEFAULT_PARAMETERS: Dict[str, Any] = {
    "method": "dualnet",
    "modality": "mri",
    "sigma": None,
    "model": None,
    "device": "auto",
    "tta": None,  # the model's default; or 1, 4, 8 transforms (true = 8, false = 1)
    "uncertainty": False,
    "views": None,
    "neb_maps": False,
}

#: The extra result maps a run can give (keys of :func:`run_denoise`'s maps; ``<kind>_output`` in a job):
#: the MC-dropout std, and the noise branch's per-voxel noise std and confidence.
MAP_KINDS = ("uncertainty", "noise_map", "confidence")


def wanted_maps(params: Dict[str, Any]) -> Tuple[str, ...]:
    """The extra result maps (:data:`MAP_KINDS`) that denoising parameters ask for: ``uncertainty``
    with ``uncertainty``, ``noise_map`` and ``confidence`` with ``neb_maps``."""
    asked = {"uncertainty": params.get("uncertainty"), "noise_map": params.get("neb_maps"),
             "confidence": params.get("neb_maps")}
    return tuple(kind for kind in MAP_KINDS if asked[kind])


def run_denoise(volume, *, progress=None, cancel=None, **params) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """Denoise a ``dualnet.io.Volume`` with ``dualnet.api.denoise_volume``.

    Returns ``(volume, maps, info)``: ``maps`` holds the extra result volumes that were asked for
    (:data:`MAP_KINDS`: ``uncertainty`` with ``uncertainty``, ``noise_map`` and ``confidence`` with
    ``neb_maps``). Unknown parameter names raise ``TypeError`` so a typo in a job file cannot be
    silently ignored.
    """
    p = dict(DEFAULT_PARAMETERS)
    unknown = set(params) - set(p)
    if unknown:
        raise TypeError(f"unknown denoising parameters: {sorted(unknown)}")
    p.update(params)
    from dualnet import api

    result = api.denoise_volume(
        volume,
        method=p["method"],
        modality=p["modality"],
        sigma=p["sigma"],
        model=p["model"],
        device=p["device"],
        tta=p["tta"],
        uncertainty=bool(p["uncertainty"]),
        views=None if p["views"] is None else int(p["views"]),
        neb_maps=bool(p["neb_maps"]),
        progress=progress,
        cancel=cancel,
    )
    info = dict(getattr(result, "info", None) or {})
    maps = {kind: getattr(result, kind) for kind in MAP_KINDS if getattr(result, kind, None) is not None}
    return result.volume, maps, info


def _print_progress(fraction: float, message: str = "") -> None:
    payload = {"fraction": round(float(fraction), 6), "message": message}
    print(f"{PROGRESS_PREFIX} {json.dumps(payload)}", flush=True)


def jsonable(value):
    """``value`` with dict keys as strings, tuples as lists, numpy scalars as Python numbers and
    anything else that is not a JSON scalar as a float when it converts, else as a string."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Run one job dictionary (see the module docstring); returns the info written."""
    from dualnet.io import read_volume, write_volume

    params = {k: job[k] for k in DEFAULT_PARAMETERS if k in job}
    _print_progress(0.0, "reading input")
    volume = read_volume(job["input"])
    volume.path = job.get("input_name") or volume.path  # messages name the scene's volume, not the staged copy
    out, maps, info = run_denoise(volume, progress=_print_progress, **params)
    outputs = [job["output"]] + [job[f"{kind}_output"] for kind in MAP_KINDS if job.get(f"{kind}_output")]
    write_volume(out, job["output"], inputs=[job["input"]])
    for kind, vol in maps.items():
        path = job.get(f"{kind}_output")
        if path:
            write_volume(vol, path, inputs=[job["input"]], outputs=[o for o in outputs if o != path])
    info = jsonable(info)
    if job.get("info_output"):
        from dualnet.io import atomic_write_bytes

        atomic_write_bytes(job["info_output"], json.dumps(info, indent=1).encode("utf-8"), inputs=[job["input"]],
                           outputs=outputs)
    _print_progress(1.0, "done")
    return info


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: worker.py JOB.json", file=sys.stderr)
        return 64
    try:
        from dualnet.errors import DualNetError
    except ImportError as err:  # pragma: no cover - broken install
        print(f"{ERROR_PREFIX} cannot import the dualnet core: {err}", flush=True)
        return 2
    try:
        job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        run_job(job)
    except DualNetError as err:
        print(f"{ERROR_PREFIX} {str(err).splitlines()[0] if str(err) else type(err).__name__}", flush=True)
        return 2
    except (OSError, ValueError, KeyError) as err:
        print(f"{ERROR_PREFIX} {type(err).__name__}: {err}", flush=True)
        return 2
    except MemoryError:
        print(f"{ERROR_PREFIX} out of memory; try a smaller volume or the CLI's --tile", flush=True)
        return 1
    except RuntimeError as err:  # e.g. a PyTorch allocator failure: one line, not a traceback
        print(f"{ERROR_PREFIX} {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
