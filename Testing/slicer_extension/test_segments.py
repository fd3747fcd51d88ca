"""Binary map -> segmentation (real Segmentations logic), statistics, ``.seg.nrrd`` written and read back."""

from __future__ import annotations

import numpy as np
import pytest
import slicerio

from ILTMAnomalyLib import PanelError, segments, volumes

from mrml_helpers import count_nodes, phantom_pet


def test_components_are_labelled_largest_first_with_a_size_floor():
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 1:3, 1:3] = True           # 4 voxels
    mask[1, 5:9, 5:9] = True           # 16 voxels
    mask[0, 0, 9] = mask[1, 1, 8] = True  # diagonal neighbours: one component with full connectivity
    labels, count = segments.label_components(mask)
    assert count == 3
    _, face_count = segments.label_components(mask, full_connectivity=False)
    assert face_count == 4
    ordered = segments.components_by_size(labels, count, voxel_ml=0.1)
    assert (ordered == 1).sum() == 16 and (ordered == 2).sum() == 4 and (ordered == 3).sum() == 2
    kept = segments.components_by_size(labels, count, voxel_ml=0.1, min_volume_ml=0.3)
    assert kept.max() == 2 and (kept > 0).sum() == 20


def test_segmentation_has_one_segment_per_component_with_exact_voxel_counts(scene, pet_node):
    _, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "PET anomalies")
    assert segmentation.GetScene() is scene
    ids = segments.segment_ids(segmentation)
    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in ids]
    assert names == ["Anomaly 1", "Anomaly 2"]
    # The reference geometry is the PET's: Segment Editor will paint on the PET grid.
    labels, _ = segments.segment_labels_on(segmentation, pet_node)
    assert (labels == 1).sum() == (lesions == 1).sum()   # the big lesion is "Anomaly 1"
    assert (labels == 2).sum() == (lesions == 2).sum()
    np.testing.assert_array_equal(labels > 0, lesions > 0)


def test_single_segment_mode(scene, pet_node):
    _, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "one", per_component=False)
    ids = segments.segment_ids(segmentation)
    assert len(ids) == 1
    assert segmentation.GetSegmentation().GetSegment(ids[0]).GetName() == "Anomaly"


def test_statistics_give_volume_in_ml_and_pet_values(scene, pet_node):
    pet, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "PET anomalies")
    rows = segments.segment_statistics(segmentation, pet_node)
    voxel_ml = 2.0 * 2.5 * 4.0 / 1000.0
    assert [r["segment"] for r in rows] == ["Anomaly 1", "Anomaly 2"]
    assert rows[0]["voxels"] == (lesions == 1).sum()
    assert rows[0]["volume_ml"] == pytest.approx((lesions == 1).sum() * voxel_ml)
    assert rows[0]["pet_max"] == pytest.approx(pet[lesions == 1].max())
    assert rows[1]["pet_mean"] == pytest.approx(pet[lesions == 2].mean())
    table = segments.statistics_table(scene, rows, "PET anomalies statistics")
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [
        "Segment", "Volume [mL]", "PET max", "PET mean", "PET peak", "TLG [mL x PET]", "Centroid X (LPS) [mm]",
        "Centroid Y (LPS) [mm]", "Centroid Z (LPS) [mm]", "Voxels"]
    assert table.GetCellText(0, 0) == "Anomaly 1"
    assert float(table.GetCellText(1, 1)) == pytest.approx(rows[1]["volume_ml"])
    # Updating the same table replaces its rows.
    segments.statistics_table(scene, rows[:1], "unused", table_node=table)
    assert table.GetNumberOfRows() == 1


def test_statistics_are_the_cores_with_units(scene, pet_node):
    """The table's numbers are iltm.lesions' (as ``iltm lesions`` writes them), titled in the PET's unit."""
    import slicer
    from iltm.lesions import Geometry, lesion_statistics

    pet, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "PET anomalies")
    rows = segments.segment_statistics(segmentation, pet_node)
    spacing, origin, direction = volumes.itk_geometry_from_ijk_to_ras(volumes.get_ijk_to_ras(pet_node))
    core = lesion_statistics(pet, lesions > 0, Geometry(spacing, origin, direction))
    assert len(core) == len(rows) == 2
    for row, lesion in zip(rows, core):
        assert row["voxels"] == lesion.voxels
        assert row["pet_peak"] == pytest.approx(lesion.suv_peak) and row["tlg"] == pytest.approx(lesion.tlg)
        assert row["centroid_lps"] == pytest.approx(lesion.centroid)
    assert rows[0]["pet_peak"] == pytest.approx(8.0)                 # a 1 mL sphere fits inside the big lesion
    assert rows[1]["pet_peak"] < rows[1]["pet_max"] == pytest.approx(6.5)  # not in the small one
    # The centroid in RAS is the LPS one with x and y negated: check it against Slicer's own IJK-to-RAS.
    centre_kji = np.argwhere(lesions == 1).mean(axis=0)
    ras = volumes.get_ijk_to_ras(pet_node) @ np.append(centre_kji[::-1], 1.0)
    assert rows[0]["centroid_lps"] == pytest.approx((-ras[0], -ras[1], ras[2]))

    assert segments.pet_unit(pet_node) is None
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning("{SUVbw}g/ml", "UCUM", "Standardized Uptake Value body weight")
    pet_node.SetVoxelValueUnits(units)
    assert segments.pet_unit(pet_node) == "SUV"
    table = segments.statistics_table(scene, rows, "t", unit=segments.pet_unit(pet_node))
    titles = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert titles[2:6] == ["SUVmax [SUV]", "SUVmean [SUV]", "SUVpeak [SUV]", "TLG [SUV*mL]"]
    units.SetValueSchemeMeaning("Bq/ml", "UCUM", "Becquerels/milliliter")
    pet_node.SetVoxelValueUnits(units)
    assert segments.pet_unit(pet_node) == "Becquerels/milliliter"
    table = segments.statistics_table(scene, rows, "t2", unit="Bq/ml")
    assert table.GetColumnName(2) == "PET max [Bq/ml]" and float(table.GetCellText(0, 4)) == pytest.approx(
        rows[0]["pet_peak"])


def test_seg_nrrd_is_written_and_read_back_with_slicerio(scene, pet_node, tmp_path):
    _, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "PET anomalies")
    path = segments.save_segmentation(segmentation, tmp_path / "anomalies")
    assert path.name == "anomalies.seg.nrrd" and path.is_file()
    read = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in read["segments"]] == ["Anomaly 1", "Anomaly 2"]
    voxels = read["voxels"]                      # indexed (i, j, k) by slicerio
    assert (voxels > 0).sum() == (lesions > 0).sum()
    by_value = {s["name"]: s["labelValue"] for s in read["segments"]}
    assert (voxels == by_value["Anomaly 1"]).sum() == (lesions == 1).sum()
    # Geometry on disk is LPS: the PET's IJK-to-RAS with x and y negated, shifted by the stored extent offset.
    offset = np.asarray(read.get("referenceImageExtentOffset", [0, 0, 0]), float)
    ijk_to_lps = volumes.LPS_TO_RAS @ volumes.get_ijk_to_ras(pet_node)
    expected = ijk_to_lps.copy()
    expected[:3, 3] = ijk_to_lps[:3, :3] @ offset + ijk_to_lps[:3, 3]
    np.testing.assert_allclose(read["ijkToLPS"], expected, atol=1e-4)
    # Voxel positions agree too: the file's (i, j, k) maps into the PET's (k, j, i).
    i, j, k = (np.argwhere(voxels > 0) + offset.astype(int)).T
    assert set(zip(k, j, i)) == set(map(tuple, np.argwhere(lesions > 0)))


def test_an_empty_map_exports_nothing_and_leaves_the_scene_alone(scene, pet_node):
    before = count_nodes(scene)
    empty = np.zeros_like(phantom_pet()[1])
    with pytest.raises(PanelError, match="no region"):
        segments.segmentation_from_mask(scene, empty, pet_node, "nothing", allow_empty=False)
    assert count_nodes(scene) == before
    # The iteration browser shows empty masks as an empty "Anomaly" segment.
    segmentation = segments.segmentation_from_mask(scene, empty, pet_node, "empty", per_component=False)
    assert len(segments.segment_ids(segmentation)) == 1


def test_a_map_on_another_grid_is_refused(scene, pet_node):
    before = count_nodes(scene)
    with pytest.raises(PanelError, match="voxels"):
        segments.segmentation_from_mask(scene, np.ones((3, 3, 3), bool), pet_node, "wrong")
    assert count_nodes(scene) == before


def test_saving_needs_a_file_name(scene, pet_node):
    segmentation = segments.segmentation_from_mask(scene, phantom_pet()[1] > 0, pet_node, "x")
    with pytest.raises(PanelError, match="file name"):
        segments.save_segmentation(segmentation, "")


WINDOWS_FORBIDDEN = set('<>:"/\\|?*') | {chr(c) for c in range(32)}


@pytest.mark.parametrize("node_name, expected", [
    ("3: PET WB anomalies", "3_ PET WB anomalies"),          # DICOM series: "<series number>: <description>"
    ('PET/CT "AC" <WB> a|b?*\\c', "PET_CT _AC_ _WB_ a_b_c"),
    ("PET\tWB\x01 ", "PET_WB_"),
    ("lesions. . ", "lesions"),
    ("CON", "_CON"), ("nul.seg", "_nul.seg"), ("LPT1", "_LPT1"),
    (":::", "segmentation"),
])
def test_default_file_name_is_safe_on_windows(scene, node_name, expected):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
    path = segments.default_segmentation_file("/scenes", segmentation)
    assert path.name == expected + ".seg.nrrd"
    assert not set(path.name) & WINDOWS_FORBIDDEN
    assert path.parent.as_posix() == "/scenes"


def test_a_dicom_named_segmentation_saves_under_its_default_name(scene, pet_node, tmp_path):
    _, lesions = phantom_pet()
    segmentation = segments.segmentation_from_mask(scene, lesions > 0, pet_node, "3: PET WB/AC anomalies")
    path = segments.save_segmentation(segmentation, segments.default_segmentation_file(tmp_path, segmentation))
    assert path == tmp_path / "3_ PET WB_AC anomalies.seg.nrrd" and path.is_file()
