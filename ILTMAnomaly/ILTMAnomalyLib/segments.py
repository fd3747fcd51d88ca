"""Binary anomaly map -> segmentation node, per-component statistics, ``.seg.nrrd`` and DICOM SEG export.

A segmentation made here has the PET as its reference geometry, so Segment Editor edits it on the PET's grid,
and either one segment per connected component ("Anomaly 1", "Anomaly 2", ... largest first) or a single
"Anomaly" segment. All segments share one labelmap layer (they never overlap), which keeps the file small.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from . import PanelError, volumes

# Distinct, saturated colours that stay visible over the PET-Heat map (no reds/yellows of the heat ramp first).
SEGMENT_COLORS = (
    (0.10, 0.85, 0.95), (0.30, 0.95, 0.30), (0.95, 0.40, 0.95), (0.35, 0.55, 1.00), (1.00, 1.00, 1.00),
    (0.60, 1.00, 0.80), (0.75, 0.60, 1.00), (0.20, 0.70, 0.60), (0.95, 0.75, 0.90), (0.50, 0.85, 1.00),
)
SINGLE_SEGMENT_NAME = "Anomaly"


def label_components(mask: np.ndarray, full_connectivity: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of a binary ``mask``.

    Args:
        mask: boolean or 0/1 array, 2D or 3D.
        full_connectivity: diagonal neighbours connect (26-connectivity in 3D, 8 in 2D) when True;
            only face neighbours (6 / 4) when False.

    Returns:
        (labels, count): int32 array with 0 = background and 1..count = components.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    structure = np.ones((3,) * mask.ndim, dtype=bool) if full_connectivity else None
    labels, count = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False), int(count)


def components_by_size(labels: np.ndarray, count: int, voxel_ml: float, min_volume_ml: float = 0.0) -> np.ndarray:
    """Relabel components 1..n from largest to smallest, dropping those under ``min_volume_ml``."""
    if count == 0:
        return np.zeros_like(labels, dtype=np.int32)
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    new_label = np.zeros(count + 1, dtype=np.int32)
    next_label = 1
    for old_index in order:
        if sizes[old_index] * voxel_ml >= min_volume_ml:
            new_label[old_index + 1] = next_label
            next_label += 1
    return new_label[labels]


def labelmap_node_from_array(labels: np.ndarray, reference_volume, name: str = "labels"):
    """A label map node (not in any scene) holding ``labels`` on the reference volume's grid."""
    if labels.ndim == 2:
        labels = labels[np.newaxis]
    dims = reference_volume.GetImageData().GetDimensions()
    if labels.shape != (dims[2], dims[1], dims[0]):
        raise PanelError(f"The map has {labels.shape[::-1]} voxels (i, j, k) but '{reference_volume.GetName()}' "
                         f"has {tuple(dims)}.")
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16 if labels.max() < 65536 else np.int32
    volumes.update_volume_from_array(node, labels.astype(dtype), volumes.get_ijk_to_ras(reference_volume))
    return node


def segmentation_from_labelmap(scene, labelmap_node, reference_volume, name: str, per_component: bool = True,
                               min_volume_ml: float = 0.0, full_connectivity: bool = True,
                               allow_empty: bool = True):
    """A new segmentation node from a binary (or label) map on the reference volume's grid.

    Args:
        scene: where the node goes.
        labelmap_node: the map; any voxel > 0 is anomalous.
        reference_volume: the PET; becomes the segmentation's reference geometry.
        name: node name.
        per_component: one segment per connected component (largest first), else one "Anomaly" segment.
        min_volume_ml: components smaller than this are left out (per_component only).
        full_connectivity: see :func:`label_components`.
        allow_empty: an empty map gives a segmentation with one empty "Anomaly" segment; when False it raises.

    Returns:
        the segmentation node (in ``scene``, with display nodes). On failure nothing is left in the scene.
    """
    mask = volumes.array_from_volume(labelmap_node) > 0
    if mask.ndim == 4:
        raise PanelError("The anomaly map must have one value per voxel.")
    voxel_ml = volumes.voxel_volume_ml(reference_volume)
    if per_component:
        labels, count = label_components(mask, full_connectivity)
        labels = components_by_size(labels, count, voxel_ml, min_volume_ml)
        names = [f"{SINGLE_SEGMENT_NAME} {index}" for index in range(1, int(labels.max(initial=0)) + 1)]
    else:
        labels = mask.astype(np.uint8)
        names = [SINGLE_SEGMENT_NAME] if labels.any() else []
    if not names and not allow_empty:
        smallest = f" of at least {min_volume_ml:g} mL" if per_component and min_volume_ml > 0 else ""
        raise PanelError(f"The anomaly map has no region{smallest} at this threshold: nothing to export. "
                         "Lower the threshold in the Review section.")
    source = labelmap_node_from_array(labels, reference_volume, f"{name} labels")

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        segmentation.CreateDefaultDisplayNodes()
        # ``source`` is on the PET's own grid, with no parent transform: imported while the segmentation has
        # none either, Slicer copies it without resampling. Then the segmentation goes under the PET's transform
        # (so it is drawn on the PET), and its reference geometry, taken after that, is the PET's own grid.
        if names:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation, ""):
                raise PanelError(f"Slicer could not turn the anomaly map into segments of '{name}'.")
        else:
            segmentation.GetSegmentation().AddEmptySegment("", SINGLE_SEGMENT_NAME, SEGMENT_COLORS[0])
        volumes.follow_transform(segmentation, reference_volume)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        _name_segments(segmentation, names)
        display = segmentation.GetDisplayNode()
        display.SetOpacity2DFill(0.25)
        display.SetOpacity2DOutline(1.0)
    except Exception:
        volumes.remove_node(scene, segmentation)
        raise
    return segmentation


def segmentation_from_mask(scene, mask: np.ndarray, reference_volume, name: str, **options):
    """:func:`segmentation_from_labelmap` for a numpy mask shaped like the reference volume (``(k, j, i)``)."""
    return segmentation_from_labelmap(scene, labelmap_node_from_array(np.asarray(mask), reference_volume),
                                      reference_volume, name, **options)


def _name_segments(segmentation_node, names: list[str]) -> None:
    segmentation = segmentation_node.GetSegmentation()
    by_label = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        by_label[segment.GetLabelValue()] = segment
    for label, segment in sorted(by_label.items()):
        if 1 <= label <= len(names):
            segment.SetName(names[label - 1])
            segment.SetColor(*SEGMENT_COLORS[(label - 1) % len(SEGMENT_COLORS)])


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


def segment_labels_on(segmentation_node, reference_volume) -> tuple[np.ndarray, list[str]]:
    """Every segment as label ``index + 1`` on the reference volume's grid (what the user sees, edits included).

    Returns:
        (labels shaped ``(k, j, i)``, segment ids in label order).
    """
    ids = segment_ids(segmentation_node)
    dims = reference_volume.GetImageData().GetDimensions()
    if not ids:
        return np.zeros((dims[2], dims[1], dims[0]), dtype=np.int32), ids
    # The reference volume's grid in the segmentation's coordinates: its own grid when both share a parent
    # transform (no resampling), else where the volume really lies relative to the segments.
    geometry = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        reference_volume, segmentation_node.GetParentTransformNode())
    id_array, label_array = vtk.vtkStringArray(), vtk.vtkIntArray()
    for label, segment_id in enumerate(ids, start=1):
        id_array.InsertNextValue(segment_id)
        label_array.InsertNextValue(label)
    merged = slicer.vtkOrientedImageData()
    # Needs no scene (unlike ExportSegmentsToLabelmapNode), so nothing is added even for a moment.
    ok = segmentation_node.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, id_array, label_array)
    extent = merged.GetExtent() if ok else (0, -1, 0, -1, 0, -1)
    if tuple(extent) != (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1):
        raise PanelError(f"Cannot resample the segments of '{segmentation_node.GetName()}' onto "
                         f"'{reference_volume.GetName()}'.")
    labels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    return labels.astype(np.int32), ids


def pet_unit(volume_node):
    """The unit of the PET's voxel values: "SUV" when the volume says it holds SUV (Slicer's voxel value units, as
    the PET-DICOM extension's SUV conversion sets them, e.g. ``{SUVbw}g/ml``), else the units' meaning or code
    (``Bq/ml``), else None when the volume names no unit."""
    units = volume_node.GetVoxelValueUnits() if hasattr(volume_node, "GetVoxelValueUnits") else None
    if units is None:
        return None
    value, meaning = units.GetCodeValue() or "", units.GetCodeMeaning() or ""
    if "SUV" in value.upper() or "standardized uptake" in meaning.lower():
        return "SUV"
    return meaning or value or None


def segment_statistics(segmentation_node, pet_volume) -> list[dict]:
    """Per segment, the core's lesion statistics (:func:`iltm.lesions.region_statistics`, the same numbers as
    ``iltm lesions``): voxels, volume in mL, max/mean/peak PET value, TLG and the centroid in patient coordinates
    (LPS mm, on the PET's own grid); NaN values for an empty segment. ``pet_max``/``pet_mean``/``pet_peak`` are in
    the PET's unit (:func:`pet_unit`)."""
    from iltm.lesions import Geometry, region_statistics

    labels, ids = segment_labels_on(segmentation_node, pet_volume)
    pet = volumes.array_from_volume(pet_volume).astype(np.float64)
    geometry = Geometry(*volumes.itk_geometry_from_ijk_to_ras(volumes.get_ijk_to_ras(pet_volume)))
    segmentation = segmentation_node.GetSegmentation()
    nan = float("nan")
    rows = []
    for label, segment_id in enumerate(ids, start=1):
        lesion = region_statistics(pet, labels == label, geometry, id=label)
        rows.append({
            "segment": segmentation.GetSegment(segment_id).GetName(),
            "segment_id": segment_id,
            "voxels": lesion.voxels if lesion else 0,
            "volume_ml": lesion.volume_ml if lesion else 0.0,
            "pet_max": lesion.suv_max if lesion else nan,
            "pet_mean": lesion.suv_mean if lesion else nan,
            "pet_peak": lesion.suv_peak if lesion else nan,
            "tlg": lesion.tlg if lesion else nan,
            "centroid_lps": lesion.centroid if lesion else (nan, nan, nan),
        })
    return rows


def statistics_columns(unit=None) -> list:
    """(row key, column title, kind) of the statistics table; titles carry the PET's unit: "SUVmax [SUV]" for a PET
    in SUV, "PET max [Bq/ml]" for another unit, "PET max" when the volume names none."""
    if unit == "SUV":
        value = {"pet_max": "SUVmax [SUV]", "pet_mean": "SUVmean [SUV]", "pet_peak": "SUVpeak [SUV]",
                 "tlg": "TLG [SUV*mL]"}
    else:
        suffix = f" [{unit}]" if unit else ""
        value = {"pet_max": f"PET max{suffix}", "pet_mean": f"PET mean{suffix}", "pet_peak": f"PET peak{suffix}",
                 "tlg": f"TLG [{unit}*mL]" if unit else "TLG [mL x PET]"}
    return ([("segment", "Segment", "string"), ("volume_ml", "Volume [mL]", "double")]
            + [(key, title, "double") for key, title in value.items()]
            + [(f"centroid_{axis}", f"Centroid {axis.upper()} (LPS) [mm]", "double") for axis in "xyz"]
            + [("voxels", "Voxels", "int")])


def statistics_table(scene, rows: list[dict], name: str, table_node=None, unit=None):
    """Write ``rows`` (from :func:`segment_statistics`) into a table node, new unless ``table_node`` is given.

    ``unit``: the PET's unit for the column titles (:func:`pet_unit`; "SUV" titles the SUV columns)."""
    table_node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    table.Initialize()
    for key, title, kind in statistics_columns(unit):
        column = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
        column.SetName(title)
        column.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            value = row["centroid_lps"]["xyz".index(key[-1])] if key.startswith("centroid_") else row[key]
            column.SetValue(index, str(value) if kind == "string" else value)
        table.AddColumn(column)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.Modified()
    table_node.EndModify(was_modifying)
    return table_node


# Names Windows refuses as a file name whatever the extension (CON.seg.nrrd is CON too).
RESERVED_WINDOWS_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                          *(f"COM{n}" for n in "123456789"), *(f"LPT{n}" for n in "123456789")}


def safe_file_name(name: str, fallback: str = "segmentation") -> str:
    """``name`` as a file name every platform accepts (a DICOM series loads as "3: PET WB", "PET/CT ...").

    Characters Windows forbids (``<>:"/\\|?*`` and control characters) become ``_``; trailing dots and spaces,
    which Windows drops, are removed; a reserved device name (CON, NUL, COM1, ...) gets a ``_`` prefix.
    """
    cleaned = re.sub(r'[<>:"/\\|?*\x00-\x1f\x7f]', "_", str(name))
    cleaned = re.sub(r"_+", "_", cleaned).strip().rstrip(". ")
    if not cleaned.strip("_ ."):
        cleaned = fallback
    if cleaned.split(".")[0].strip().upper() in RESERVED_WINDOWS_NAMES:
        cleaned = "_" + cleaned
    return cleaned


def default_segmentation_file(folder, segmentation_node) -> Path:
    """Where "Save segmentation" writes unless the user chose: ``folder/<safe node name>.seg.nrrd``."""
    return Path(folder) / f"{safe_file_name(segmentation_node.GetName())}.seg.nrrd"


def save_segmentation(segmentation_node, path) -> Path:
    """Write a segmentation as ``.seg.nrrd`` (the suffix is added when missing)."""
    path = Path(path)
    if str(path) in ("", "."):
        raise PanelError("Choose a file name for the segmentation first.")
    if not path.name.lower().endswith(".seg.nrrd"):
        path = path.with_name(path.name[:-5] if path.name.lower().endswith(".nrrd") else path.name)
        path = path.with_name(path.name + ".seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(segmentation_node):
        raise PanelError(f"{path}: cannot write segmentation '{segmentation_node.GetName()}'.")
    return path


def dicom_seg_file(segmentation_file) -> Path:
    """Where "Save DICOM SEG" writes: beside the ``.seg.nrrd`` file, ``<same name>_seg.dcm`` (as ``iltm detect
    --dicom-seg`` names its SEGs)."""
    from iltm.layout import DICOM_SEG_SUFFIX

    path = Path(segmentation_file)
    if str(path) in ("", "."):
        raise PanelError("Choose a file name for the segmentation first: the DICOM SEG is saved beside it.")
    name = path.name
    for suffix in (".seg.nrrd", ".nrrd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name or 'segmentation'}{DICOM_SEG_SUFFIX}")


def dicom_source_files(pet_volume, file_for_instance) -> list[Path]:
    """The DICOM files of a PET loaded by Slicer's DICOM module, file k holding slice k of the volume.

    Slicer's scalar volume plugin stores the series' SOP Instance UIDs in the volume's ``DICOM.instanceUIDs``
    attribute, the k-th for slice k (reversed with the slices when it makes a left-handed volume right-handed);
    ``file_for_instance`` (``slicer.dicomDatabase.fileForInstance``) finds each file. Each file's position and
    orientation are checked against the volume's own geometry, so a SEG can never land on the wrong slices.
    """
    import pydicom

    name = pet_volume.GetName()
    uids = (pet_volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        raise PanelError(f"'{name}' was not loaded from DICOM (it has no DICOM instance UIDs): load the PET with "
                         f"the DICOM module to export DICOM SEG, or save the segmentation as .seg.nrrd.")
    dims = pet_volume.GetImageData().GetDimensions()
    if len(uids) != dims[2]:
        raise PanelError(f"'{name}' has {dims[2]} slices but {len(uids)} DICOM instances (a multi-frame or "
                         f"reshaped series): DICOM SEG export needs one file per slice.")
    ijk_to_lps = volumes.LPS_TO_RAS @ volumes.get_ijk_to_ras(pet_volume)
    axes = ijk_to_lps[:3, :3] / np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    slice_spacing = float(np.linalg.norm(ijk_to_lps[:3, 2]))
    files = []
    for k, uid in enumerate(uids):
        found = file_for_instance(uid)
        if not found or not Path(found).is_file():
            raise PanelError(f"'{name}': the DICOM file of slice {k} (instance {uid}) is no longer in the DICOM "
                             f"database.")
        path = Path(found)
        try:
            header = pydicom.dcmread(os.fspath(path), stop_before_pixels=True,
                                     specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
            position = np.array([float(v) for v in header.ImagePositionPatient])
            orientation = np.array([float(v) for v in header.ImageOrientationPatient])
        except Exception as exc:  # pydicom raises many types for damaged or incomplete files
            raise PanelError(f"{path}: cannot read its position and orientation ({exc.__class__.__name__}: "
                             f"{exc}).") from None
        expected = ijk_to_lps[:3, 3] + k * ijk_to_lps[:3, 2]
        if (np.abs(orientation[:3] - axes[:, 0]).max() > 1e-3 or np.abs(orientation[3:] - axes[:, 1]).max() > 1e-3
                or np.linalg.norm(position - expected) > 0.5 * slice_spacing):
            raise PanelError(f"'{name}': slice {k} does not lie where its DICOM file {path.name} says (the volume "
                             f"was resampled, moved or reordered since it was loaded), so a DICOM SEG would not "
                             f"line up: save the segmentation as .seg.nrrd instead.")
        files.append(path)
    return files


def save_dicom_seg(segmentation_node, pet_volume, path, file_for_instance) -> Path:
    """Write the segmentation's segments, as shown and edited, as a DICOM SEG that references the PET's series.

    One DICOM segment per Slicer segment, with its name, coded as a lesion (``iltm.dicom_seg``); written atomically,
    so a failure leaves no file. ``file_for_instance``: see :func:`dicom_source_files`.
    """
    from iltm.dicom_seg import write_dicom_seg
    from iltm.errors import InputError, WriteError

    path = Path(path)
    if str(path) in ("", "."):
        raise PanelError("Choose a file name for the DICOM SEG first.")
    files = dicom_source_files(pet_volume, file_for_instance)
    labels, ids = segment_labels_on(segmentation_node, pet_volume)
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetSegment(segment_id).GetName() for segment_id in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_dicom_seg(labels, files, path, segment_names=names)
    except (InputError, WriteError) as exc:
        raise PanelError(str(exc)) from None
