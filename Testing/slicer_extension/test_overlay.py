"""Score overlay display set-up (PET-Heat colours, opacity, window, threshold) and the live binary map."""

from __future__ import annotations

import math

import numpy as np
import pytest

import slicer
from ILTMAnomalyLib import overlay, volumes

from mrml_helpers import phantom_pet


def _score_node(scene, pet_node, score_array, name="PET anomaly score"):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    volumes.update_volume_from_array(node, score_array.astype(np.float32), volumes.get_ijk_to_ras(pet_node))
    scene.AddNode(node)
    return node


def _composites(scene, names=("Red", "Yellow", "Green")):
    made = []
    for name in names:
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
        made.append(composite)
    return made


def test_thresholds_convert_between_density_and_score():
    assert overlay.score_threshold(0.005) == pytest.approx(-math.log(0.005))
    assert overlay.density_threshold(overlay.score_threshold(0.02)) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        overlay.score_threshold(0.0)


def test_overlay_uses_pet_heat_over_the_pet_in_every_view(scene, pet_node):
    _, lesions = phantom_pet()
    score = _score_node(scene, pet_node, np.where(lesions > 0, 12.0, 1.0))
    red, yellow, green = _composites(scene)
    threshold = overlay.score_threshold(0.005)
    overlay.show_score_overlay(scene, pet_node, score, threshold, opacity=0.6)

    display = score.GetScalarVolumeDisplayNode()
    assert display.GetColorNodeID() == overlay.PET_HEAT_COLOR_ID == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert scene.GetNodeByID(display.GetColorNodeID()).GetName() == "PET-Heat"
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(threshold)
    assert display.GetWindowLevelMax() == pytest.approx(12.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(threshold)
    for composite in (red, yellow, green):
        assert composite.GetBackgroundVolumeID() == pet_node.GetID()
        assert composite.GetForegroundVolumeID() == score.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)

    overlay.set_overlay_opacity(scene, 0.25, score)
    assert red.GetForegroundOpacity() == pytest.approx(0.25)
    overlay.set_score_window(score, 6.0, 9.0)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((6.0, 9.0))


def test_pet_heat_is_created_when_the_scene_has_no_default_colours():
    bare = slicer.vtkMRMLScene()
    assert bare.GetNodeByID(overlay.PET_HEAT_COLOR_ID) is None
    color = overlay.pet_heat_color_node(bare)
    assert color.IsA("vtkMRMLPETProceduralColorNode") and color.GetName() == "PET-Heat"
    assert overlay.pet_heat_color_node(bare) is color
    # Hot end of the heat ramp is white, cold end black, the middle red-orange (R > G > B).
    lut = color.GetColorTransferFunction()
    low, high = lut.GetRange()
    assert np.allclose(lut.GetColor(low), (0, 0, 0), atol=0.05)
    assert np.allclose(lut.GetColor(high), (1, 1, 1), atol=0.05)
    r, g, b = lut.GetColor(low + 0.25 * (high - low))
    assert r > g >= b


def test_binary_map_follows_the_threshold_live(scene, pet_node):
    pet, lesions = phantom_pet()
    score = _score_node(scene, pet_node, pet)
    binary, count = overlay.update_binary_map(scene, score, 7.0, name="PET anomaly mask")
    assert binary.IsA("vtkMRMLLabelMapVolumeNode") and binary.GetName() == "PET anomaly mask"
    assert count == (pet > 7.0).sum() == (lesions == 1).sum()
    nodes = scene.GetNumberOfNodes()
    same, count = overlay.update_binary_map(scene, score, 6.0, binary)
    assert same is binary and scene.GetNumberOfNodes() == nodes
    assert count == (lesions > 0).sum()
    np.testing.assert_array_equal(volumes.array_from_volume(binary), (pet > 6.0).astype(np.uint8))
    assert volumes.same_geometry(binary, pet_node, tolerance=1e-9)

    _composites(scene, ("Red",))
    overlay.show_score_overlay(scene, pet_node, score, 6.0, binary_map=binary)
    red = overlay.slice_composite_nodes(scene)[0]
    assert red.GetLabelVolumeID() == binary.GetID()
