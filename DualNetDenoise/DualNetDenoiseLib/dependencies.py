"""Python dependencies of the extension: checked in one place, installed once, with one question.

* PyTorch comes from Slicer's *PyTorch* extension (``PyTorchUtils``), which picks the build that
  fits the GPU and driver; it is never pip-installed here, and an installed torch older than
  :data:`MIN_TORCH` is refused with a message (a loaded torch cannot be replaced without a restart).
* Other packages (safetensors, scikit-image, onnxruntime for the network's CPU graphs, ``tomli`` on
  Python < 3.11 for training, the optional
  bm4d/bm3d baselines) are pip-installed after the user agreed, in ONE confirmation that lists
  everything (the PyTorch extension is told not to ask again).
* Packages Slicer ships (:data:`PROTECTED`) are never upgraded: every pip call gets a constraints
  file pinning their installed versions (pip then picks compatible versions of the rest or fails
  cleanly); :data:`NEVER_PIP` ones (numpy, SimpleITK, vtk, torch) are never named as a requirement.

Pure functions take the installers and the confirmation as arguments, so they run (and are
tested) without Slicer; :func:`slicer_pip_install` and :func:`slicer_install_torch` are the
Slicer installers (tested with a fake ``slicer.util.pip_install`` / ``PyTorchUtils``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

#: minimum PyTorch version of the core (pyproject ``torch>=2.1``).
MIN_TORCH = "2.1"
#: import name -> pip requirement, for packages pip may install.
PIP_PACKAGES: Dict[str, str] = {
    "safetensors": "safetensors>=0.4",
    "skimage": "scikit-image>=0.21",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
    "tomli": "tomli>=2.0",
    "onnxruntime": "onnxruntime>=1.17",
}
#: optional baselines (non-commercial licence), installed only when the method is chosen.
OPTIONAL_PACKAGES: Dict[str, str] = {"bm4d": "bm4d>=4.2", "bm3d": "bm3d>=4.0"}
#: distributions Slicer ships: pinned to their installed version on every pip install, never upgraded.
PROTECTED: Tuple[str, ...] = ("numpy", "scipy", "SimpleITK", "vtk", "torch", "torchvision", "requests", "pydicom",
                              "Pillow", "packaging")
#: never pip-installed from this extension (torch: the PyTorch extension; the rest: Slicer's own).
NEVER_PIP: Tuple[str, ...] = ("torch", "torchvision", "SimpleITK", "numpy", "vtk")
#: "method" name of the training panel (not a denoising method).
TRAINING = "training"


class DependencyError(RuntimeError):
    """A dependency is missing and could not (or may not) be installed; the message is one line."""


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_version(distribution: str) -> Optional[str]:
    """Installed version of a distribution (from its metadata, without importing it), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # broken metadata
        return None


def version_tuple(version: str) -> Tuple[int, ...]:
    """``"2.1.0+cu118"`` -> ``(2, 1, 0)`` (release part only; enough for minimum-version checks)."""
    release = re.match(r"\s*v?(\d+(?:\.\d+)*)", version or "")
    return tuple(int(p) for p in release.group(1).split(".")) if release else ()


def at_least(version: Optional[str], minimum: str) -> bool:
    if not version:
        return False
    have, need = version_tuple(version), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def missing(modules: Iterable[str]) -> List[str]:
    return [m for m in modules if not is_installed(m)]


def required_modules(method: str, python_version: Tuple[int, int] = sys.version_info[:2]) -> List[str]:
    """Import names a run with ``method`` (or ``"training"``) needs; torch only for the network."""
    mods = ["scipy", "skimage"]
    if method in ("dualnet", TRAINING):
        mods += ["torch", "safetensors"]
    if method == "dualnet":
        mods.append("onnxruntime")  # the shipped models' CPU graphs (PyTorch would run them, slower)
    if method == TRAINING and tuple(python_version) < (3, 11):
        mods.append("tomli")  # dualnet.training.config reads TOML; tomllib is stdlib only from 3.11
    if method in OPTIONAL_PACKAGES:
        mods.append(method)
    return mods


@dataclass
class InstallPlan:
    """What a method still needs: PyTorch (through the PyTorch extension) and pip requirements."""

    method: str
    torch: bool = False
    pip: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip

    def items(self) -> List[str]:
        return ([f"PyTorch >={MIN_TORCH} (PyTorch extension)"] if self.torch else []) + list(self.pip)

    def question(self) -> str:
        """The single confirmation text: every package, the licence note, what stays untouched."""
        lines = [f"DualNet needs these Python packages for '{self.method}':"]
        lines += [f"  - {item}" for item in self.items()]
        if any(requirement_name(r) in OPTIONAL_PACKAGES for r in self.pip):
            lines.append("bm4d/bm3d are under a non-commercial licence.")
        lines.append("Slicer's own packages (" + ", ".join(PROTECTED[:4]) + ", ...) are kept at their installed "
                     "versions. Downloading can take several minutes. Install now?")
        return "\n".join(lines)

    def missing_message(self) -> str:
        """One line naming what is missing and how to install it (non-interactive runs)."""
        hints = []
        if self.torch:
            hints.append(f"PyTorch: install the 'PyTorch' extension from the Extensions Manager and use PyTorch Utils "
                         f"(version >={MIN_TORCH}), or pip install 'torch>={MIN_TORCH}' outside Slicer")
        if self.pip:
            hints.append("pip packages: open the DualNet Denoise panel once (it offers to install them) or run "
                         "python -m pip install " + " ".join(f"'{r}'" for r in self.pip))
        return f"missing Python packages for '{self.method}': {', '.join(self.items())}; " + "; ".join(hints)


def plan_installation(method: str, python_version: Tuple[int, int] = sys.version_info[:2]) -> InstallPlan:
    """What must be installed before ``method`` can run.

    Raises:
        DependencyError: an installed torch is older than :data:`MIN_TORCH`, or a package Slicer
            ships (numpy, SimpleITK, ...) is missing: neither is fixed by installing here.
    """
    plan = InstallPlan(method)
    for module in missing(required_modules(method, python_version)):
        if module == "torch":
            plan.torch = True
        elif module in PIP_PACKAGES or module in OPTIONAL_PACKAGES:
            plan.pip.append(PIP_PACKAGES.get(module) or OPTIONAL_PACKAGES[module])
        else:
            raise DependencyError(f"'{module}' is missing but ships with Slicer: reinstall Slicer")
    if not plan.torch and "torch" in required_modules(method, python_version):
        version = installed_version("torch")
        if version is not None and not at_least(version, MIN_TORCH):
            raise DependencyError(
                f"PyTorch {version} is older than the {MIN_TORCH} DualNet needs: in the PyTorch Utils module uninstall "
                f"it, install with version requirement '>={MIN_TORCH}', then restart Slicer")
    return plan


def ensure_dependencies(
    method: str,
    *,
    interactive: bool,
    confirm: Optional[Callable[[str], bool]] = None,
    pip_install: Optional[Callable[[List[str]], None]] = None,
    install_torch: Optional[Callable[[str], None]] = None,
) -> List[str]:
    """Make sure what ``method`` needs is importable; returns what was installed.

    Args:
        interactive: ask once with ``confirm`` before installing; when False nothing is
            installed and a missing package raises (batch scripts must not block on a dialog).
        confirm: ``confirm(message) -> bool``; asked exactly once, listing every package.
        pip_install: installs a list of pip requirements (must keep :data:`PROTECTED` pinned).
        install_torch: ``install_torch(minimum_version)`` through the PyTorch extension, without
            asking again.

    Raises:
        DependencyError: with a one-line message saying what to install.
    """
    plan = plan_installation(method)
    if plan.empty:
        return []
    if not interactive or (plan.torch and install_torch is None) or (plan.pip and pip_install is None):
        raise DependencyError(plan.missing_message())
    if confirm is not None and not confirm(plan.question()):
        raise DependencyError(f"installation of {', '.join(plan.items())} declined; '{method}' needs them")
    installed: List[str] = []
    if plan.torch:
        install_torch(MIN_TORCH)
        installed.append("torch")
    if plan.pip:
        pip_install(list(plan.pip))
        installed += plan.pip
    importlib.invalidate_caches()
    still = missing(required_modules(method))
    if still:
        raise DependencyError(f"installed {', '.join(installed)} but {', '.join(still)} cannot be imported yet: "
                              f"restart Slicer")
    return installed


# ------------------------------------------------------------------------------- Slicer installers
def requirement_name(requirement: str) -> str:
    """``"scikit-image>=0.21"`` -> ``"scikit-image"``."""
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]


def protected_constraints() -> List[str]:
    """``name==version`` for every installed :data:`PROTECTED` distribution."""
    pins = []
    for name in PROTECTED:
        version = installed_version(name)
        if version:
            pins.append(f"{name}=={version}")
    return pins


def pip_arguments(requirements: List[str], constraints_file: str) -> List[str]:
    """``pip install`` arguments: the requirements plus ``-c`` the protected-packages pins.

    Raises:
        DependencyError: a requirement names a package this extension never pip-installs.
    """
    for req in requirements:
        name = requirement_name(req).lower()
        if name in (n.lower() for n in NEVER_PIP):
            raise DependencyError(f"{req}: not installed with pip from DualNet (Slicer or the PyTorch extension provides it)")
        if name.startswith("-"):
            raise DependencyError(f"{req}: pip options are not accepted here")
    return [*requirements, "-c", constraints_file]


def _accepts_keyword(func: Callable, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def slicer_pip_install(requirements: List[str]) -> None:
    """Install ``requirements`` with ``slicer.util.pip_install``, keeping Slicer's packages pinned.

    One call (one resolver run) with a constraints file; on Slicer versions whose ``pip_install``
    asks by itself (``interactive=``), it is told not to: the user was asked already.
    """
    import slicer

    if not requirements:
        return
    with tempfile.TemporaryDirectory(prefix="DualNet-pip-") as folder:
        path = os.path.join(folder, "slicer-constraints.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(protected_constraints()) + "\n")
        args = pip_arguments(list(requirements), path)
        if _accepts_keyword(slicer.util.pip_install, "interactive"):
            slicer.util.pip_install(args, interactive=False)
        else:
            slicer.util.pip_install(args)


def slicer_install_torch(minimum_version: str = MIN_TORCH) -> None:
    """Install PyTorch (``>= minimum_version``) with Slicer's PyTorch extension, without asking again."""
    try:
        import PyTorchUtils  # type: ignore
    except ImportError:
        raise DependencyError("the 'PyTorch' extension is not installed: install it from the Extensions Manager "
                              "and restart Slicer") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={minimum_version}")
        if torch is None:
            raise DependencyError("PyTorch installation was cancelled or failed")
    version = installed_version("torch")
    if version is not None and not at_least(version, minimum_version):
        raise DependencyError(f"PyTorch {version} is older than {minimum_version}: update it in PyTorch Utils and "
                              f"restart Slicer")


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
