"""DICOM SEG of a binary map: highdicom and dcmqi read it back onto the mask's grid; ``detect --dicom-seg``."""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cli_helpers import run_cli
from iltm import __version__
from iltm.dicom_seg import write_dicom_seg
from iltm.io import dicom_series_files, read_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_helpers import write_pet_series  # noqa: E402


def _run_dcmqi(seg: Path, out: Path) -> None:
    import subprocess

    out.mkdir()
    code = ("import sys; from dcmqi import segimage2itkimage; sys.argv[0] = 'segimage2itkimage'; "
            "sys.exit(segimage2itkimage())")
    proc = subprocess.run([sys.executable, "-c", code, "--inputDICOM", str(seg), "--outputDirectory", str(out),
                           "--outputType", "nifti"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture()
def series3d(tmp_path):
    activity = np.full((7, 12, 10), 1000.0)
    activity[1:3, 2:5, 2:5] = 7000.0          # lesion 1: 18 voxels
    activity[5, 9, 8] = 9000.0                # lesion 2: 1 voxel
    folder = tmp_path / "dicom" / "PET_1"
    write_pet_series(folder, activity, spacing=(3.0, 2.5, 4.0), origin=(-15.0, 22.0, -300.0))
    pet = read_image(folder)
    mask = sitk.Cast(pet > 5000.0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    return folder, pet, mask


@pytest.mark.parametrize("split", [False, True])
def test_seg_round_trip_through_highdicom_and_dcmqi(series3d, tmp_path, split):
    folder, pet, mask = series3d
    files = dicom_series_files(folder)
    seg_path = write_dicom_seg(sitk.GetArrayFromImage(mask), files, tmp_path / "p_seg.dcm", split_lesions=split)
    seg = hd.seg.segread(str(seg_path))
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == "PH001"
    assert seg.get_segment_numbers() == ([1, 2] if split else [1])
    for number in seg.get_segment_numbers():
        desc = seg.get_segment_description(number)
        assert desc.segmented_property_category.value == "49755003"
        assert desc.segmented_property_category.scheme_designator == "SCT"
        assert desc.segmented_property_type.value == "52988006"
        assert desc.algorithm_identification[0].AlgorithmName == "ILTM"
        assert desc.algorithm_identification[0].AlgorithmVersion == __version__
    # highdicom: the frames by source instance, in slice order, give back the mask.
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], combine_segments=True)
    truth = sitk.GetArrayFromImage(mask)
    assert np.array_equal(pixels > 0, truth > 0)
    if split:
        assert int((pixels == 1).sum()) == 18 and int((pixels == 2).sum()) == 1
    # dcmqi: one image per segment, on exactly the mask's grid.
    out = tmp_path / "dcmqi"
    _run_dcmqi(seg_path, out)
    union = np.zeros_like(truth, dtype=bool)
    for number in seg.get_segment_numbers():
        img = sitk.ReadImage(str(out / f"{number}.nii.gz"))
        assert img.GetSize() == mask.GetSize()
        assert np.allclose(img.GetSpacing(), mask.GetSpacing(), atol=1e-5)
        assert np.allclose(img.GetOrigin(), mask.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetDirection(), mask.GetDirection(), atol=1e-6)
        union |= sitk.GetArrayFromImage(img) > 0
    assert np.array_equal(union, truth > 0)


def test_detect_dicom_seg_and_lesions_on_dicom_series(run2d, cohort2d, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    slice2d = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float64)
    root = tmp_path / "dicom"
    for name in ("PET_a", "PET_b"):  # a folder of series folders, each one slice
        write_pet_series(root / name, slice2d[None] * 1000.0 + 1.0, spacing=(2.0, 2.0, 3.0))
    out = tmp_path / "results"
    assert run_cli("detect", "--run", run2d, "--input", root, "--out", out, "--no-png", "--density-threshold", "0.5",
                   "--lesions", "--dicom-seg", "--split-lesions", "--units", "BQML") == 0
    scans = (out / "scans.csv").read_text(encoding="utf-8").splitlines()
    assert scans[0] == "id,lesion_count,mtv_ml [mL],total_tlg [BQML*mL],scan_score [-ln density] (max)"
    assert [line.split(",")[0] for line in scans[1:]] == ["PET_a", "PET_b"]
    assert all(int(line.split(",")[1]) > 0 for line in scans[1:])  # tau = 0.5 flags regions in every scan
    for name in ("PET_a", "PET_b"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_mask.nii.gz")))
        table = (out / f"{name}_lesions.csv").read_text(encoding="utf-8").splitlines()
        assert table[0].startswith("id,voxels,volume_ml [mL],pet_max [BQML]")
        assert sum(int(row.split(",")[1]) for row in table[1:]) == int(mask.sum())
        seg = hd.seg.segread(str(out / f"{name}_seg.dcm"))
        source = pydicom.dcmread(str(next((root / name).iterdir())), stop_before_pixels=True)
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]
        assert np.array_equal(pixels > 0, mask > 0)
        assert len(seg.get_segment_numbers()) == max(len(table) - 1, 1)
    # Without --units the tables name the series' own Units tag (the run reads DICOM as stored, not in SUV).
    plain = tmp_path / "plain"
    assert run_cli("detect", "--run", run2d, "--input", root / "PET_a", "--out", plain, "--no-png",
                   "--density-threshold", "0.5", "--lesions") == 0
    assert (plain / "PET_a_lesions.csv").read_text(encoding="utf-8").startswith("id,voxels,volume_ml [mL],pet_max [BQML]")


def test_dicom_seg_of_a_nifti_input_fails_before_any_work(run2d, cohort2d, tmp_path, capsys):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    out = tmp_path / "results"
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", out, "--dicom-seg") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iltm: error: {image}: --dicom-seg needs DICOM series as input")
    assert not out.exists()
