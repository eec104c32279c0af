"""MRML volume node <-> ``dualnet.io.Volume`` conversion, geometry kept exactly.

Conventions (easy to get wrong, so written down once here):

* ``vtkImageData`` scalars of a volume node are stored x fastest, so the numpy view is
  ``(k, j, i) = (z, y, x)``, the order ``dualnet`` uses everywhere.
* A Slicer volume node keeps its geometry in the IJK-to-RAS matrix; the image data itself has
  unit spacing and zero origin.
* ``dualnet.io.Volume`` keeps ITK geometry: spacing (x, y, z), origin and a row-major direction
  matrix, in LPS. With ``F = diag(-1, -1, 1)``:
  ``IJKToRAS[:3, :3] = F @ D @ diag(spacing)`` and ``IJKToRAS[:3, 3] = F @ origin``.

The geometry functions take and return plain 4x4 numpy arrays or ``vtkMatrix4x4`` objects and
import ``vtk`` only when they need it, so they are testable without Slicer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

#: RAS <-> LPS flip of the first two axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def matrix_to_numpy(matrix) -> np.ndarray:
    """A 4x4 float64 numpy array from a ``vtkMatrix4x4`` or any 4x4 array-like."""
    if hasattr(matrix, "GetElement"):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {arr.shape}")
    return arr


def numpy_to_vtk_matrix(array: np.ndarray):
    """A ``vtkMatrix4x4`` holding the 4x4 ``array``."""
    import vtk

    arr = matrix_to_numpy(array)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(arr[r, c]))
    return m


def itk_geometry_from_ijk_to_ras(ijk_to_ras) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """ITK ``(spacing_xyz, origin_lps_xyz, direction_row_major)`` from an IJK-to-RAS matrix.

    Raises:
        ValueError: when a column of the matrix has zero length (degenerate geometry).
    """
    m = matrix_to_numpy(ijk_to_ras)
    lps = LPS_TO_RAS @ m[:3, :3]  # F is its own inverse
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate IJK-to-RAS matrix (zero voxel size): {m.tolist()}")
    direction = lps / spacing
    origin = LPS_TO_RAS @ m[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def ijk_to_ras_from_itk_geometry(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix for ITK geometry (3D; 2D geometry is padded with a unit z axis)."""
    spacing = list(map(float, spacing))
    origin = list(map(float, origin))
    direction = list(map(float, direction))
    if len(spacing) == 2:
        d2 = np.asarray(direction, dtype=np.float64).reshape(2, 2)
        d3 = np.eye(3)
        d3[:2, :2] = d2
        spacing, origin, direction = spacing + [1.0], origin + [0.0], d3.ravel().tolist()
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ d @ np.diag(spacing)
    m[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return m


def get_ijk_to_ras(node) -> np.ndarray:
    """The IJK-to-RAS matrix of a volume node as a 4x4 numpy array."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


def set_ijk_to_ras(node, ijk_to_ras) -> None:
    """Set the IJK-to-RAS matrix of a volume node (numpy 4x4 or ``vtkMatrix4x4``)."""
    node.SetIJKToRASMatrix(ijk_to_ras if hasattr(ijk_to_ras, "GetElement") else numpy_to_vtk_matrix(ijk_to_ras))


def array_from_node(node, copy: bool = True) -> np.ndarray:
    """Voxel array of a scalar or labelmap volume node in (z, y, x) order.

    Args:
        node: ``vtkMRMLScalarVolumeNode`` (or a subclass such as a labelmap node).
        copy: return a copy (default) rather than a view on VTK-owned memory.

    Raises:
        ValueError: the node has no image data or more than one component per voxel.
    """
    from vtk.util import numpy_support

    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise ValueError(f"volume node '{name}' has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; a scalar volume is needed")
    shape = tuple(reversed(image.GetDimensions()))
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    return arr.copy() if copy else arr


def volume_from_node(node, *, squeeze_2d: bool = True, metadata: Optional[dict] = None):
    """A ``dualnet.io.Volume`` (copied voxels, ITK/LPS geometry) from a volume node.

    A single-slice volume becomes a 2D Volume when ``squeeze_2d`` (its third axis dropped),
    which is what the core expects for 2D images such as ultrasound frames.
    """
    from dualnet.io import Volume

    arr = array_from_node(node, copy=True)
    spacing, origin, direction = itk_geometry_from_ijk_to_ras(get_ijk_to_ras(node))
    meta = dict(metadata or {})
    if squeeze_2d and arr.shape[0] == 1:
        d2 = np.asarray(direction).reshape(3, 3)[:2, :2]
        if not np.allclose(d2 @ d2.T, np.eye(2), atol=1e-6):
            # an oblique slice has no exact 2D direction; the 2D volume only feeds the core's
            # voxel work (spacing), and the logic puts the node's own IJK-to-RAS on the result
            d2 = np.eye(2)
        return Volume(arr[0], spacing[:2], origin[:2], tuple(d2.ravel().tolist()), meta, None)
    return Volume(arr, spacing, origin, direction, meta, None)


def _image_data_from_array(array: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(array)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2D or 3D array, got shape {array.shape}")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    scalars = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def update_node_from_array(node, array: np.ndarray, ijk_to_ras) -> None:
    """Put a (z, y, x) array into ``node`` with the given IJK-to-RAS matrix (deep copy).

    ``ijk_to_ras`` is copied as is, so an output node takes its input's geometry bit for bit.
    """
    image = _image_data_from_array(array)
    was = node.StartModify()
    try:
        node.SetSpacing(1.0, 1.0, 1.0)
        node.SetOrigin(0.0, 0.0, 0.0)
        set_ijk_to_ras(node, ijk_to_ras)
        node.SetAndObserveImageData(image)
    finally:
        node.EndModify(was)


def update_node_from_volume(node, volume) -> None:
    """Put a ``dualnet.io.Volume`` into ``node``, converting its ITK/LPS geometry to RAS."""
    update_node_from_array(node, volume.array, ijk_to_ras_from_itk_geometry(volume.spacing, volume.origin, volume.direction))


def same_geometry(a, b, atol: float = 1e-6) -> bool:
    """True when two IJK-to-RAS matrices agree within ``atol``."""
    return bool(np.allclose(matrix_to_numpy(a), matrix_to_numpy(b), atol=atol, rtol=0))
