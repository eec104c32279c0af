"""Python dependencies of the extension, set up on first use.

PyTorch comes from Slicer's *PyTorch* extension (``PyTorchUtils``), which picks the build that
fits the GPU and driver; it is never pip-installed here. Other packages (safetensors,
scikit-image, the optional bm4d/bm3d baselines) are pip-installed only after the user agreed.
Slicer's own SimpleITK, numpy and torch are never replaced. Pure functions take the installer
and the confirmation as arguments so they run (and are tested) without Slicer.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Iterable, List, Optional

#: import name -> pip requirement, for packages pip may install.
PIP_PACKAGES: Dict[str, str] = {
    "safetensors": "safetensors>=0.4",
    "skimage": "scikit-image>=0.21",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
}
#: optional baselines (non-commercial licence), installed only when the method is chosen.
OPTIONAL_PACKAGES: Dict[str, str] = {"bm4d": "bm4d>=4.2", "bm3d": "bm3d>=4.0"}
#: never installed by pip from this extension.
NEVER_PIP = ("torch", "SimpleITK", "numpy", "vtk")


class DependencyError(RuntimeError):
    """A dependency is missing and could not (or may not) be installed."""


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(modules: Iterable[str]) -> List[str]:
    return [m for m in modules if not is_installed(m)]


def required_modules(method: str) -> List[str]:
    """Import names a run with ``method`` needs (torch only for the network)."""
    mods = ["scipy", "skimage"]
    if method == "dualnet":
        mods += ["torch", "safetensors"]
    if method in OPTIONAL_PACKAGES:
        mods.append(method)
    return mods


def ensure_dependencies(
    method: str,
    *,
    interactive: bool,
    confirm: Optional[Callable[[str], bool]] = None,
    pip_install: Optional[Callable[[List[str]], None]] = None,
    install_torch: Optional[Callable[[], None]] = None,
) -> List[str]:
    """Make sure what ``method`` needs is importable; returns what was installed.

    Args:
        interactive: ask with ``confirm`` before installing; when False nothing is installed
            and a missing package raises (batch scripts must not block on a dialog).
        confirm: ``confirm(message) -> bool``.
        pip_install: installs a list of pip requirements.
        install_torch: installs PyTorch through the PyTorch extension.

    Raises:
        DependencyError: with a one-line message saying what to install.
    """
    need = missing(required_modules(method))
    if not need:
        return []
    installed: List[str] = []
    if "torch" in need:
        if not interactive or install_torch is None:
            raise DependencyError("PyTorch is not installed: install the 'PyTorch' extension from the Extensions Manager "
                                  "(or run PyTorchUtils) and restart Slicer")
        if confirm is not None and not confirm("DualNet needs PyTorch. Install it now with the PyTorch extension? "
                                               "This can take several minutes."):
            raise DependencyError("PyTorch is required for the DualNet network; installation declined")
        install_torch()
        installed.append("torch")
        need.remove("torch")
    reqs = [PIP_PACKAGES.get(m) or OPTIONAL_PACKAGES.get(m) for m in need]
    reqs = [r for r in reqs if r]
    if reqs:
        if not interactive or pip_install is None:
            raise DependencyError(f"missing Python packages: {', '.join(reqs)}; install them with "
                                  f"slicer.util.pip_install or run the module interactively once")
        note = " (bm4d/bm3d: non-commercial licence)" if any(m in OPTIONAL_PACKAGES for m in need) else ""
        if confirm is not None and not confirm(f"DualNet needs {', '.join(reqs)}{note}. Install with pip now?"):
            raise DependencyError(f"installation of {', '.join(reqs)} declined")
        pip_install(reqs)
        installed += reqs
    return installed


def slicer_install_torch(minimum_version: str = "2.1") -> None:  # pragma: no cover - needs Slicer
    """Install PyTorch with Slicer's PyTorch extension (``PyTorchUtils``)."""
    try:
        import PyTorchUtils  # type: ignore
    except ImportError:
        raise DependencyError("the 'PyTorch' extension is not installed: install it from the Extensions Manager") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={minimum_version}")
        if torch is None:
            raise DependencyError("PyTorch installation was cancelled or failed")


def slicer_pip_install(requirements: List[str]) -> None:  # pragma: no cover - needs Slicer
    import slicer

    for req in requirements:
        if any(req.split(">")[0].split("=")[0].strip().lower() == n.lower() for n in NEVER_PIP):
            raise DependencyError(f"{req}: not installed with pip from DualNet (Slicer provides it)")
        slicer.util.pip_install(req)


def device_summary() -> str:
    """One line on the compute device: CUDA GPU name and memory, Apple MPS, or CPU only.

    Imports torch only if it is installed (importing it the first time takes seconds).
    """
    if not is_installed("torch"):
        return "PyTorch not installed (CPU methods only until it is)"
    try:
        import torch
    except Exception as err:  # broken install
        return f"PyTorch cannot be imported: {err}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB (torch {torch.__version__})"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return f"GPU: Apple MPS (torch {torch.__version__})"
    return f"CPU only (torch {torch.__version__}); the network will be slow on large volumes"
