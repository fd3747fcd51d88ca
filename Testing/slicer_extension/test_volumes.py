"""Volume <-> array and volume files through storage nodes, with a rotated, anisotropic PET (real MRML)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer
from ILTMAnomalyLib import PanelError, volumes

from mrml_helpers import count_nodes, phantom_pet, rotated_direction


def test_itk_geometry_converts_to_ras_and_back():
    spacing, origin, direction = (2.0, 2.5, 4.0), (-31.5, 12.25, -80.0), rotated_direction().reshape(-1)
    ijk_to_ras = volumes.ijk_to_ras_from_itk(spacing, origin, direction)
    # x and y flip between LPS and RAS, z does not.
    np.testing.assert_allclose(ijk_to_ras[:3, 3], (31.5, -12.25, -80.0))
    back = volumes.itk_geometry_from_ijk_to_ras(ijk_to_ras)
    np.testing.assert_allclose(back[0], spacing)
    np.testing.assert_allclose(back[1], origin)
    np.testing.assert_allclose(back[2], direction, atol=1e-12)


def test_reading_a_rotated_anisotropic_pet_keeps_its_geometry(scene, pet_file):
    image = sitk.ReadImage(str(pet_file))
    before = count_nodes(scene)
    node = volumes.read_volume(scene, pet_file, "PET")
    assert count_nodes(scene) > before and node.GetScene() is scene
    expected = volumes.ijk_to_ras_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    np.testing.assert_allclose(volumes.get_ijk_to_ras(node), expected, atol=1e-5)
    np.testing.assert_array_equal(volumes.array_from_volume(node), sitk.GetArrayFromImage(image))
    assert volumes.voxel_volume_ml(node) == pytest.approx(2.0 * 2.5 * 4.0 / 1000.0)
    assert volumes.volume_spatial_dims(node) == 3


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_writing_and_reading_back_is_a_round_trip(scene, pet_node, tmp_path, suffix):
    path = volumes.write_volume(pet_node, tmp_path / f"again{suffix}")
    image = sitk.ReadImage(str(path))
    original = sitk.ReadImage(str(tmp_path / "pet.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    node = volumes.read_volume(scene, path, "again")
    assert volumes.same_geometry(node, pet_node, tolerance=1e-4)


def test_array_round_trip_keeps_voxel_order_and_geometry(scene):
    pet, _ = phantom_pet(shape=(5, 7, 9))
    ijk_to_ras = volumes.ijk_to_ras_from_itk((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), rotated_direction().reshape(-1))
    node = slicer.vtkMRMLScalarVolumeNode()
    volumes.update_volume_from_array(node, pet, ijk_to_ras)
    assert node.GetImageData().GetDimensions() == (9, 7, 5)
    np.testing.assert_array_equal(volumes.array_from_volume(node), pet)
    np.testing.assert_allclose(volumes.get_ijk_to_ras(node), ijk_to_ras)
    # Voxel (i=8, j=0, k=4) lands where the matrix says.
    ras = ijk_to_ras @ np.array([8, 0, 4, 1.0])
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    point = matrix.MultiplyPoint((8, 0, 4, 1))
    np.testing.assert_allclose(point, ras)


def test_unreadable_files_raise_and_leave_the_scene_alone(scene, tmp_path):
    before = count_nodes(scene)
    with pytest.raises(PanelError, match="file not found"):
        volumes.read_volume(scene, tmp_path / "missing.nii.gz", "x")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image" * 20)
    with pytest.raises(PanelError, match="cannot read"):
        volumes.read_volume(scene, corrupt, "x")
    assert count_nodes(scene) == before


def _volume(scene, array, cls="vtkMRMLScalarVolumeNode", name="v"):
    node = scene.AddNewNodeByClass(cls, name)
    volumes.update_volume_from_array(node, array, np.eye(4))
    return node


def test_volume_problems_name_what_is_wrong(scene):
    assert volumes.volume_problem(None) == "Select a PET volume first."
    good = _volume(scene, np.ones((4, 5, 6), np.float32), name="PET")
    assert volumes.volume_problem(good) is None
    label = _volume(scene, np.ones((4, 5, 6), np.uint8), "vtkMRMLLabelMapVolumeNode", "seg")
    assert "label map" in volumes.volume_problem(label)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(6, 5, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    assert "3 values per voxel" in volumes.volume_problem(rgb)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert "no voxels" in volumes.volume_problem(empty)
    line = _volume(scene, np.ones((1, 1, 6), np.float32), name="line")
    assert "not an image" in volumes.volume_problem(line)
    flat = _volume(scene, np.ones((1, 5, 6), np.float32), name="slice")
    assert volumes.volume_problem(flat) is None and volumes.volume_spatial_dims(flat) == 2


def test_a_frame_of_a_4d_sequence_is_refused(scene):
    frame = _volume(scene, np.ones((4, 5, 6), np.float32), name="PET frame")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "dynamic PET")
    sequence.SetDataNodeAtValue(frame, "0")
    # Slicer's Sequences module registers the browser class; a bare scene needs it done by hand.
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "dynamic PET browser")
    set_primary = (getattr(browser, "SetAndObservePrimarySequenceNodeID", None)
                   or browser.SetAndObserveMasterSequenceNodeID)
    set_primary(sequence.GetID())
    browser.AddProxyNode(frame, sequence, False)
    problem = volumes.volume_problem(frame)
    assert problem is not None and "4D sequence" in problem and "dynamic PET browser" in problem
