"""DualNet core: denoising of low-resolution medical volumes.

Pure Python (numpy, scipy, SimpleITK, torch); imports neither ``slicer`` nor Qt, so the same
code runs in a Slicer panel, a Slicer CLI module, a batch script and plain Python.

Array convention everywhere in this package: numpy arrays are indexed (z, y, x) for volumes
and (y, x) for 2D images, as returned by ``SimpleITK.GetArrayFromImage`` and Slicer's
``arrayFromVolume``. Spacing, origin and direction follow ITK (x, y, z) order in LPS space.
"""

__version__ = "0.1.0"

from .errors import DualNetError, InputError, CancelledError  # noqa: F401
from .io import Volume, read_volume, write_volume  # noqa: F401
