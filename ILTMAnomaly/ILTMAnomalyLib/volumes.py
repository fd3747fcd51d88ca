"""Volume nodes <-> numpy arrays with their geometry, and volume files through Slicer's storage nodes.

Geometry conventions: Slicer keeps a volume's voxel-to-world transform as a 4x4 IJK-to-RAS matrix (world
axes point to the patient's Right, Anterior, Superior). ITK, SimpleITK and the NIfTI/NRRD files the ``iltm``
core reads and writes use LPS (Left, Posterior, Superior): the same matrix with its first two rows negated.
``ijk_to_ras_from_itk`` and ``itk_geometry_from_ijk_to_ras`` convert between the two, so a scan's spacing,
origin and direction (rotations included) survive the trip Slicer -> file -> core -> file -> Slicer.

Arrays are indexed ``[k, j, i]`` (slice, row, column), as numpy-based tools and ``slicer.util.arrayFromVolume``
index them; a 2D scan is a volume with one slice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from . import PanelError

# diag(-1, -1, 1, 1): flips x and y, so it converts LPS <-> RAS in either direction.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras_from_itk(spacing, origin, direction) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of an ITK/SimpleITK image geometry.

    Args:
        spacing: voxel size in mm along i, j, k (ITK order).
        origin: world position of voxel (0, 0, 0) in LPS mm.
        direction: 3x3 direction cosines, row-major (``image.GetDirection()``), columns = i, j, k axes in LPS.
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(np.asarray(spacing, dtype=float))
    ijk_to_lps[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ ijk_to_lps


def itk_geometry_from_ijk_to_ras(ijk_to_ras) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in ITK's LPS convention from a 4x4 IJK-to-RAS matrix."""
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    return tuple(spacing), tuple(ijk_to_lps[:3, 3]), tuple(direction.reshape(-1))


def get_ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_ijk_to_ras(volume_node, ijk_to_ras) -> None:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r][c]))
    volume_node.SetIJKToRASMatrix(matrix)


def voxel_volume_ml(volume_node) -> float:
    """Volume of one voxel in millilitres (mm^3 / 1000); rotations do not change it."""
    return float(abs(np.linalg.det(get_ijk_to_ras(volume_node)[:3, :3]))) / 1000.0


def array_from_volume(volume_node) -> np.ndarray:
    """A copy of the voxels, shape ``(k, j, i)`` (``(k, j, i, c)`` for multi-component volumes)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        raise PanelError(f"Volume '{_name(volume_node)}' has no voxels.")
    dims = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def update_volume_from_array(volume_node, array, ijk_to_ras=None) -> None:
    """Replace a volume's voxels by ``array`` (shape ``(k, j, i)``), and its geometry when ``ijk_to_ras`` is given."""
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"expected a (k, j, i) array, got shape {array.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    # deep=1 copies, so the node never points into memory numpy may free.
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1), deep=1)
    image.GetPointData().SetScalars(scalars)
    was_modifying = volume_node.StartModify()
    if ijk_to_ras is not None:
        set_ijk_to_ras(volume_node, ijk_to_ras)
    volume_node.SetAndObserveImageData(image)
    volume_node.EndModify(was_modifying)


def volume_spatial_dims(volume_node) -> int:
    """2 when the volume is a single slice (one voxel thick along k), else 3."""
    dims = volume_node.GetImageData().GetDimensions()
    return 2 if dims[2] == 1 else 3


def volume_problem(volume_node, scene=None) -> Optional[str]:
    """Why this node cannot be given to the detector, or None when it can: one static scalar 2D/3D image."""
    if volume_node is None:
        return "Select a PET volume first."
    name = _name(volume_node)
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        return f"'{name}' is a {volume_node.GetClassName()}, not a scalar volume: select a PET volume."
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"'{name}' is a label map, not an image: select the PET volume."
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        return f"'{name}' has no voxels."
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        return (f"'{name}' has {components} values per voxel (a colour, vector or multi-frame/4D volume); "
                "ILTM needs one scalar value per voxel: select a single-frame PET volume.")
    if volume_node.IsA("vtkMRMLVectorVolumeNode") or volume_node.IsA("vtkMRMLMultiVolumeNode"):
        return f"'{name}' is a vector or multi-frame volume; select a single-frame scalar PET volume."
    browser = _sequence_browser_of(volume_node, scene or volume_node.GetScene())
    if browser is not None:
        return (f"'{name}' is one frame of the 4D sequence '{browser}'; ILTM works on one static scan. "
                "Clone the frame you want (Data module: right-click > Clone) and select the clone.")
    dims = image.GetDimensions()
    if sum(d > 1 for d in dims) < 2:
        return f"'{name}' has {dims[0]}x{dims[1]}x{dims[2]} voxels: that is not an image."
    if dims[2] > 1 and (dims[0] == 1 or dims[1] == 1):
        return f"'{name}' is a single slice along i or j ({dims[0]}x{dims[1]}x{dims[2]}); 2D scans must be one k slice."
    return None


def _sequence_browser_of(volume_node, scene) -> Optional[str]:
    if scene is None or volume_node.GetID() is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for index in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(index)
        if browser.IsProxyNodeID(volume_node.GetID()):
            return browser.GetName()
    return None


def _name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed volume)"


def _storage_messages(storage_node) -> str:
    messages = storage_node.GetUserMessages() if hasattr(storage_node, "GetUserMessages") else None
    if messages is None or messages.GetNumberOfMessages() == 0:
        return ""
    text = messages.GetAllMessagesAsString().strip()
    return " ".join(line.strip(" -") for line in text.splitlines() if line.strip())


def read_volume(scene, path, name: str, labelmap: bool = False, show: bool = True):
    """Read a volume file (NIfTI, NRRD, ...) into a new node, added to ``scene`` only when reading succeeded.

    With ``scene=None`` the node stays outside any scene (to check it before adding it with :func:`add_volume`).

    The node keeps no storage node, so Slicer's Save dialog asks where to put it instead of overwriting the
    (possibly temporary) file it came from.

    Raises:
        PanelError: the file is missing or unreadable; the scene is unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise PanelError(f"{path}: file not found.")
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise PanelError(f"{path}: cannot read this file as a volume. {_storage_messages(storage)}".strip())
    node.SetName(name)
    if scene is not None:
        add_volume(scene, node, show)
    return node


def add_volume(scene, node, show: bool = True):
    """Add a volume node to the scene, with display nodes when it is to be shown."""
    scene.AddNode(node)
    if show:
        node.CreateDefaultDisplayNodes()
    return node


def follow_transform(node, reference) -> None:
    """Put ``node`` under ``reference``'s parent transform (both in the same scene), so they move together.

    Results computed on a volume's voxel grid (scores, masks, segments) are in its local coordinates: without its
    parent transform they would be drawn where the volume was before it was registered or moved.
    """
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID() if reference is not None else None)


def write_volume(volume_node, path, compress: bool = True) -> Path:
    """Write a volume node to ``path`` (format from the extension; LPS on disk, as every ITK tool expects).

    The file holds the volume's own grid: a parent transform is not applied (see :func:`follow_transform`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetUseCompression(bool(compress))
    if not storage.WriteData(volume_node):
        raise PanelError(f"{path}: cannot write volume '{_name(volume_node)}'. {_storage_messages(storage)}".strip())
    return path


def same_geometry(node_a, node_b, tolerance: float = 1e-3) -> bool:
    """Same voxel grid (dimensions) and IJK-to-RAS within ``tolerance`` (mm, or unitless for directions)."""
    dims_a = node_a.GetImageData().GetDimensions()
    dims_b = node_b.GetImageData().GetDimensions()
    if tuple(dims_a) != tuple(dims_b):
        return False
    return bool(np.allclose(get_ijk_to_ras(node_a), get_ijk_to_ras(node_b), atol=tolerance))


def remove_node(scene, node) -> None:
    """Remove a node with the display and storage nodes it owns (a bare scene leaves those behind)."""
    if node is None or node.GetScene() is not scene:
        return
    owned = []
    for getter, counter in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"),
                            ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, counter):
            owned += [getattr(node, getter)(index) for index in range(getattr(node, counter)())]
    scene.RemoveNode(node)
    for child in owned:
        if child is not None and child.GetScene() is scene:
            scene.RemoveNode(child)
