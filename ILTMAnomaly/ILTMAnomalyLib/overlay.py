"""The anomaly score shown over the PET in the slice views, and the binary map that follows a threshold live.

The score (``-log`` KDE density, higher = more anomalous) is the foreground layer with the PET-Heat colour map;
voxels under the display threshold are transparent, so the PET shows through wherever the detector sees
nothing unusual. The binary map (score > threshold) is the label layer, drawn as an outline.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from iltm.layout import DEFAULT_DENSITY_THRESHOLD  # noqa: F401  (the panel's default tau, as overlay.DEFAULT_DENSITY_THRESHOLD)

from . import PanelError, volumes

PET_HEAT_COLOR_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
PET_HEAT_NAME = "PET-Heat"


def score_threshold(density_threshold: float) -> float:
    """The score (``-ln f``) above which a voxel is anomalous for density threshold ``tau``: ``-ln tau``."""
    if not density_threshold > 0:
        raise ValueError("the density threshold must be > 0")
    return -math.log(density_threshold)


def density_threshold(score_threshold_value: float) -> float:
    return math.exp(-score_threshold_value)


def pet_heat_color_node(scene):
    """Slicer's PET-Heat colour node; made (with Slicer's own id) in a scene that has no default colours."""
    import slicer

    node = scene.GetNodeByID(PET_HEAT_COLOR_ID)
    if node is None:
        found = scene.GetNodesByClassByName("vtkMRMLPETProceduralColorNode", PET_HEAT_NAME)
        node = found.GetItemAsObject(0) if found.GetNumberOfItems() else None
    if node is None:
        node = slicer.vtkMRMLPETProceduralColorNode()
        node.SetTypeToHeat()
        node.SetName(PET_HEAT_NAME)
        node.SetSingletonTag(PET_HEAT_NAME)
        node.SetHideFromEditors(False)
        scene.AddNode(node)
    return node


def score_display_range(score: np.ndarray, threshold: float) -> tuple[float, float]:
    """Window low/high for the score: from the threshold to a high percentile (at least a small span)."""
    finite = score[np.isfinite(score)]
    high = float(np.percentile(finite, 99.9)) if finite.size else threshold + 1.0
    return threshold, max(high, threshold + 1e-3)


def slice_composite_nodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return [nodes.GetItemAsObject(index) for index in range(nodes.GetNumberOfItems())]


def show_score_overlay(scene, pet_volume, score_volume, threshold: float, opacity: float = 0.5,
                       window: Optional[tuple[float, float]] = None, binary_map=None) -> None:
    """Set every slice view to PET (background) + heat-coloured score (foreground) [+ binary map outline].

    Args:
        threshold: scores below it are not drawn (transparent); also the low end of the default window.
        opacity: foreground opacity, 0..1.
        window: (low, high) score range mapped onto the colour ramp; default threshold .. 99.9th percentile.
        binary_map: label map shown as an outline in the label layer (None leaves the label layer alone).
    """
    for node in (pet_volume, score_volume):
        if node is not None and node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    color = pet_heat_color_node(scene)
    display = score_volume.GetScalarVolumeDisplayNode()
    if window is None:
        window = score_display_range(volumes.array_from_volume(score_volume), threshold)
    was_modifying = display.StartModify()
    display.SetAndObserveColorNodeID(color.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    set_display_threshold(score_volume, threshold)
    display.SetInterpolate(False)
    display.EndModify(was_modifying)

    for composite in slice_composite_nodes(scene):
        was_modifying = composite.StartModify()
        composite.SetBackgroundVolumeID(pet_volume.GetID())
        composite.SetForegroundVolumeID(score_volume.GetID())
        composite.SetForegroundOpacity(float(opacity))
        if binary_map is not None:
            composite.SetLabelVolumeID(binary_map.GetID())
            composite.SetLabelOpacity(1.0)
        composite.EndModify(was_modifying)
    if binary_map is not None:
        slices = scene.GetNodesByClass("vtkMRMLSliceNode")
        for index in range(slices.GetNumberOfItems()):
            slices.GetItemAsObject(index).SetUseLabelOutline(True)


def set_display_threshold(score_volume, threshold: float) -> None:
    """Hide scores below ``threshold`` in the views (the voxels themselves are untouched)."""
    display = score_volume.GetScalarVolumeDisplayNode()
    if display is None:
        return
    display.SetApplyThreshold(True)
    display.SetAutoThreshold(False)
    display.SetThreshold(float(threshold), float(np.finfo(np.float32).max))


def set_overlay_opacity(scene, opacity: float, score_volume=None) -> None:
    """Foreground opacity of the views showing ``score_volume`` (all views when None)."""
    for composite in slice_composite_nodes(scene):
        if score_volume is None or composite.GetForegroundVolumeID() == score_volume.GetID():
            composite.SetForegroundOpacity(float(opacity))


def set_score_window(score_volume, low: float, high: float) -> None:
    display = score_volume.GetScalarVolumeDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(float(low), float(max(high, low + 1e-6)))


def binary_map_array(score_volume, threshold: float) -> np.ndarray:
    score = volumes.array_from_volume(score_volume)
    if score.ndim != 3:
        raise PanelError(f"'{score_volume.GetName()}' must have one score per voxel.")
    return (score > threshold).astype(np.uint8)


def update_binary_map(scene, score_volume, threshold: float, binary_map=None, name: Optional[str] = None):
    """Set ``binary_map`` to score > threshold (creating the label map node the first time).

    Returns:
        (label map node, number of anomalous voxels).
    """
    mask = binary_map_array(score_volume, threshold)
    ijk_to_ras = volumes.get_ijk_to_ras(score_volume)
    if binary_map is None:
        import slicer

        binary_map = slicer.vtkMRMLLabelMapVolumeNode()
        volumes.update_volume_from_array(binary_map, mask, ijk_to_ras)
        binary_map.SetName(name or f"{score_volume.GetName()} binary map")
        scene.AddNode(binary_map)
        binary_map.CreateDefaultDisplayNodes()
    else:
        volumes.update_volume_from_array(binary_map, mask, ijk_to_ras)
    volumes.follow_transform(binary_map, score_volume)
    return binary_map, int(mask.sum())
