"""The panel's DICOM SEG export: a PET loaded "from DICOM" (as Slicer's DICOM module leaves it: the series' instance
UIDs on the volume, slice k's first) and an edited segmentation go out as a DICOM SEG that highdicom reads back onto
exactly the PET's slices; anything that would not line up is one clear error and no file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ILTMAnomalyLib import PanelError, segments, volumes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for the shared DICOM writer
from dicom_helpers import write_pet_series  # noqa: E402


@pytest.fixture
def dicom_pet(scene, tmp_path):
    """(volume node, {uid: file}, lesion labels): the series is read the way Slicer's plugin stacks it, sorted by
    position, and the node gets the ``DICOM.instanceUIDs`` attribute it sets."""
    from iltm.io import dicom_series_files, read_image

    activity = np.full((6, 14, 11), 1000.0)
    lesions = np.zeros(activity.shape, np.uint8)
    lesions[1:3, 2:6, 2:5] = 1   # 24 voxels
    lesions[4, 10:12, 8] = 2     # 2 voxels
    activity[lesions > 0] = 8000.0
    folder = tmp_path / "dicom" / "PT"
    write_pet_series(folder, activity, spacing=(3.0, 2.5, 4.0), origin=(-15.0, 22.0, -300.0))
    files = dicom_series_files(folder)
    nifti = tmp_path / "pet.nii.gz"
    sitk.WriteImage(read_image(folder), str(nifti))
    node = volumes.read_volume(scene, nifti, "3: PET WB")
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files]
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return node, dict(zip(uids, files)), lesions


def _read_back(path: Path, node):
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = node.GetAttribute("DICOM.instanceUIDs").split()
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    return seg, labels


def test_edited_segments_go_out_on_the_pets_own_slices(scene, dicom_pet, tmp_path):
    node, database, lesions = dicom_pet
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, node, "3: PET WB anomalies")
    first, second = segments.segment_ids(segmentation)
    segmentation.GetSegmentation().GetSegment(second).SetName("Node, left hilum")
    path = segments.dicom_seg_file(tmp_path / "out" / "3_ PET WB anomalies.seg.nrrd")
    assert path.name == "3_ PET WB anomalies_seg.dcm"
    with pytest.raises(PanelError, match="Choose a file name"):
        segments.dicom_seg_file("")

    written = segments.save_dicom_seg(segmentation, node, path, database.get)

    assert written == path and path.is_file()
    seg, labels = _read_back(path, node)
    assert [d.segment_label for d in seg.SegmentSequence] == ["Anomaly 1", "Node, left hilum"]
    np.testing.assert_array_equal(labels, lesions)  # slice k of the PET is slice k of the SEG
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == set(database)


def test_volume_not_loaded_from_dicom_is_refused(scene, pet_node, tmp_path):
    segmentation = segments.segmentation_from_mask(scene, np.ones((12, 40, 48), bool), pet_node, "anomalies")
    with pytest.raises(PanelError, match="was not loaded from DICOM"):
        segments.save_dicom_seg(segmentation, pet_node, tmp_path / "a_seg.dcm", {}.get)
    assert not any(tmp_path.glob("*.dcm"))


def test_slices_out_of_order_are_refused_and_nothing_is_written(scene, dicom_pet, tmp_path):
    node, database, lesions = dicom_pet
    node.SetAttribute("DICOM.instanceUIDs", " ".join(reversed(node.GetAttribute("DICOM.instanceUIDs").split())))
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, node, "anomalies")
    with pytest.raises(PanelError, match="slice 0 does not lie where its DICOM file"):
        segments.save_dicom_seg(segmentation, node, tmp_path / "a_seg.dcm", database.get)
    assert not (tmp_path / "a_seg.dcm").exists()


def test_moved_volume_is_refused(scene, dicom_pet, tmp_path):
    node, database, lesions = dicom_pet
    matrix = volumes.get_ijk_to_ras(node)
    matrix[2, 3] += 10.0  # 10 mm along the slices: more than half of the 4 mm spacing
    volumes.set_ijk_to_ras(node, matrix)
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, node, "anomalies")
    with pytest.raises(PanelError, match="would not line up"):
        segments.save_dicom_seg(segmentation, node, tmp_path / "a_seg.dcm", database.get)


def test_missing_database_file_is_named(scene, dicom_pet, tmp_path):
    node, database, lesions = dicom_pet
    uids = node.GetAttribute("DICOM.instanceUIDs").split()
    database[uids[3]].unlink()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, node, "anomalies")
    with pytest.raises(PanelError, match=r"slice 3 .* is no longer in the DICOM database"):
        segments.save_dicom_seg(segmentation, node, tmp_path / "a_seg.dcm", database.get)
    assert not (tmp_path / "a_seg.dcm").exists()


def test_panel_logic_saves_beside_the_seg_nrrd_and_needs_a_database(monkeypatch, scene, dicom_pet, tmp_path):
    from slicer_app_stubs import import_module_file

    module = import_module_file(monkeypatch, scene)
    node, database, lesions = dicom_pet
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, node, "anomalies", per_component=False)
    logic = module.ILTMAnomalyLogic
    monkeypatch.delattr("slicer.dicomDatabase", raising=False)
    with pytest.raises(PanelError, match="DICOM database is not open"):
        logic.saveDicomSegmentation(segmentation, node, tmp_path / "anomalies.seg.nrrd")

    class Database:  # what the panel uses of slicer.dicomDatabase (ctkDICOMDatabase)
        isOpen = True

        @staticmethod
        def fileForInstance(uid):
            return str(database[uid])

    monkeypatch.setattr("slicer.dicomDatabase", Database, raising=False)
    path = logic.saveDicomSegmentation(segmentation, node, tmp_path / "anomalies.seg.nrrd")
    assert path == tmp_path / "anomalies_seg.dcm"
    seg, labels = _read_back(path, node)
    assert [d.segment_label for d in seg.SegmentSequence] == ["Anomaly"]
    np.testing.assert_array_equal(labels, lesions > 0)
