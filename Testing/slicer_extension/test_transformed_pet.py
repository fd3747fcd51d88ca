"""A PET under a parent transform (registered to a CT, moved by hand): results follow it, statistics do not move.

Real MRML from slicer-core: a linear transform node translates (and, in the second case, rotates) the PET; the
fake CLI scores it. Score, binary map and segmentation must sit under the PET's transform (else the overlay is
shifted by the transform), and region statistics must be computed on the PET's own voxel grid: with the
translation the big lesion's mean PET value once read 0.833 instead of its true value, at 40 mm its region had
0 voxels.
"""

from __future__ import annotations

import numpy as np
import pytest
import vtk

from ILTMAnomalyLib import jobs, overlay, segments, workflow

from mrml_helpers import make_run, phantom_pet


def _transform(scene, translation, angle_deg=0.0):
    matrix = vtk.vtkTransform()
    matrix.Translate(*translation)
    matrix.RotateZ(angle_deg)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetMatrixTransformToParent(matrix.GetMatrix())
    return node


def _detect_and_export(scene, pet_node, tmp_path, fake_cli):
    detection = workflow.start_detection(pet_node, make_run(tmp_path / "run"), command=fake_cli)
    assert detection.job.wait(timeout=120) is jobs.JobState.SUCCEEDED, detection.job.error_message
    score, mask = workflow.finish_detection(scene, detection)
    binary, _ = overlay.update_binary_map(scene, score, 7.0, None, "binary")
    segmentation = segments.segmentation_from_labelmap(scene, binary, pet_node, "anomalies")
    return score, mask, binary, segmentation


@pytest.mark.parametrize("translation, angle", [((10.0, 0.0, 0.0), 0.0), ((40.0, -25.0, 12.0), 0.0),
                                                ((10.0, 5.0, 0.0), 30.0)])
def test_results_follow_the_pets_transform_and_statistics_stay(scene, pet_node, tmp_path, fake_cli, translation,
                                                               angle):
    pet, lesions = phantom_pet()
    transform = _transform(scene, translation, angle)
    pet_node.SetAndObserveTransformNodeID(transform.GetID())

    score, mask, binary, segmentation = _detect_and_export(scene, pet_node, tmp_path, fake_cli)
    for node in (score, mask, binary, segmentation):
        assert node.GetTransformNodeID() == transform.GetID(), f"{node.GetName()} is not under the PET's transform"

    rows = segments.segment_statistics(segmentation, pet_node)
    assert [row["voxels"] for row in rows] == [int((lesions == 1).sum())]
    assert rows[0]["pet_mean"] == pytest.approx(float(pet[lesions == 1].mean()))
    assert rows[0]["pet_max"] == pytest.approx(8.0)
    labels, _ = segments.segment_labels_on(segmentation, pet_node)
    np.testing.assert_array_equal(labels > 0, lesions == 1)


def test_statistics_of_an_untransformed_segmentation_over_a_transformed_pet(scene, pet_node):
    """A segmentation made elsewhere, in world coordinates, is resampled onto where the PET really is."""
    pet, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions == 1, pet_node, "world")
    assert segmentation.GetTransformNodeID() is None
    # Moving the PET afterwards moves it away from the segmentation: the segment now covers other voxels.
    pet_node.SetAndObserveTransformNodeID(_transform(scene, (0.0, 0.0, 40.0)).GetID())
    rows = segments.segment_statistics(segmentation, pet_node)
    assert rows[0]["voxels"] < int((lesions == 1).sum())
