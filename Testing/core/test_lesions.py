"""Per-lesion PET statistics (iltm.lesions, ``iltm lesions``), checked against brute-force computations."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import run_cli
from iltm import lesions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_helpers import write_pet_series  # noqa: E402


def _image(array, spacing, origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin[: img.GetDimension()])
    if direction is not None:
        img.SetDirection(direction)
    return img


def _brute_peak(pet_img, region):
    """Highest sphere mean over centres in ``region``, distances between voxel centres in patient space."""
    pet = sitk.GetArrayFromImage(pet_img).astype(np.float64)
    idx = np.argwhere(np.ones(pet.shape, bool))
    points = np.array([pet_img.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx])
    values = pet[tuple(idx.T)]
    best = -math.inf
    for centre in np.argwhere(region):
        c = np.array(pet_img.TransformIndexToPhysicalPoint([int(v) for v in centre[::-1]]))
        inside = np.sum((points - c) ** 2, axis=1) <= 6.2 ** 2
        best = max(best, values[inside].mean())
    return best


def test_peak_sphere_holds_one_millilitre():
    kernel = lesions.peak_kernel((1.0, 1.0, 1.0))
    assert kernel.shape == (13, 13, 13)
    lattice = sum(1 for x in range(-7, 8) for y in range(-7, 8) for z in range(-7, 8) if x * x + y * y + z * z <= 38.44)
    assert int(kernel.sum()) == lattice == 1021  # voxel centres within 6.2 mm: ~1 mL (the sphere is 998 mm^3)
    anisotropic = lesions.peak_kernel((2.0, 2.0, 4.0))  # x, y, z: z is numpy axis 0
    assert anisotropic.shape == (3, 7, 7)


def test_lesion_statistics_match_brute_force_3d():
    rng = np.random.default_rng(4)
    pet = rng.uniform(0.5, 2.0, (9, 10, 11))
    mask = np.zeros(pet.shape, bool)
    mask[2:4, 2:5, 2:4] = True                    # 12 voxels: the larger region, id 1
    pet[3, 3, 3] = 9.0
    mask[6, 6, 6] = mask[7, 7, 7] = True          # touch at a corner: one region under 26-connectivity, id 2
    rotation = sitk.VersorTransform((0.2, 0.1, 0.3), 0.7).GetMatrix()
    img = _image(pet, (2.0, 2.5, 3.0), (-40.0, 12.0, 300.0), rotation)
    score = rng.normal(size=pet.shape)
    found = lesions.lesion_statistics(sitk.GetArrayFromImage(img), mask, lesions.Geometry.of(img), score)
    assert [x.voxels for x in found] == [12, 2]
    pet32 = sitk.GetArrayFromImage(img).astype(np.float64)
    regions = [np.zeros_like(mask) for _ in range(2)]
    regions[0][2:4, 2:5, 2:4] = True
    regions[1][6, 6, 6] = regions[1][7, 7, 7] = True
    for lesion, region in zip(found, regions):
        assert lesion.volume_ml == pytest.approx(region.sum() * 2.0 * 2.5 * 3.0 / 1000.0)
        assert lesion.suv_max == pytest.approx(pet32[region].max())
        assert lesion.suv_mean == pytest.approx(pet32[region].mean())
        assert lesion.tlg == pytest.approx(pet32[region].mean() * lesion.volume_ml)
        assert lesion.score_max == pytest.approx(score[region].max())
        assert lesion.suv_peak == pytest.approx(_brute_peak(img, region), rel=1e-9)
        centre = np.argwhere(region).mean(axis=0)[::-1]
        assert lesion.centroid == pytest.approx(img.TransformContinuousIndexToPhysicalPoint(centre.tolist()))
    assert found[0].suv_peak < found[0].suv_max  # the sphere averages the hot voxel with its neighbours
    totals = lesions.scan_totals(found, score)
    assert totals.lesion_count == 2 and totals.mtv_ml == pytest.approx(14 * 15.0 / 1000.0)
    assert totals.total_tlg == pytest.approx(found[0].tlg + found[1].tlg)
    assert totals.scan_score == pytest.approx(score.max())


def test_2d_regions_are_8_connected():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    mask[4, 5] = True
    found = lesions.lesion_statistics(np.ones((6, 6)), mask, lesions.Geometry((1.0, 2.0), (0.0, 0.0), (1, 0, 0, 1)))
    assert [x.voxels for x in found] == [2, 1]
    assert found[1].centroid == pytest.approx((5.0, 8.0))  # x = column 5 * 1 mm, y = row 4 * 2 mm
    assert found[0].volume_ml == pytest.approx(2 * 2.0 / 1000.0)


def test_lesions_cli_on_a_dicom_series(tmp_path, capsys):
    activity = np.full((5, 12, 14), 1000.0)
    activity[1:3, 4:7, 5:8] = 6000.0
    series = tmp_path / "pet"
    write_pet_series(series, activity, spacing=(4.0, 4.0, 3.0), origin=(-20.0, -30.0, 10.0))
    from iltm.io import read_image

    pet = read_image(series)
    mask = sitk.Cast(pet > 3000.0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "lesions.csv"
    assert run_cli("lesions", "--pet", series, "--mask", tmp_path / "mask.nii.gz", "--out", out,
                   "--units", "BQML") == 0
    assert "1 lesions, metabolic tumour volume 0.864 mL" in capsys.readouterr().out
    rows = list(csv.reader(out.read_text(encoding="utf-8").splitlines()))
    header, row = rows[0], dict(zip(rows[0], rows[1]))
    assert header[:7] == ["id", "voxels", "volume_ml [mL]", "pet_max [BQML]", "pet_mean [BQML]", "pet_peak [BQML]",
                          "tlg [BQML*mL]"]
    assert len(rows) == 2 and int(row["voxels"]) == 18
    assert float(row["pet_max [BQML]"]) == pytest.approx(6000.0, rel=1e-3)
    # LPS centroid: column 6 -> x = -20 + 6*4, row 5 -> y = -30 + 5*4, slices 1-2 -> z = 10 + 1.5*3
    assert [float(row[f"centroid_{a}_lps [mm]"]) for a in "xyz"] == pytest.approx([4.0, -10.0, 14.5])


def test_lesions_cli_rejects_a_mask_on_another_grid(tmp_path, capsys):
    pet = _image(np.ones((4, 5, 6)), (1.0, 1.0, 1.0))
    sitk.WriteImage(pet, str(tmp_path / "pet.nii.gz"))
    sitk.WriteImage(_image(np.ones((4, 5, 7)), (1.0, 1.0, 1.0)), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "lesions.csv"
    assert run_cli("lesions", "--pet", tmp_path / "pet.nii.gz", "--mask", tmp_path / "mask.nii.gz", "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"iltm: error: {tmp_path / 'mask.nii.gz'}: grid")
    assert not out.exists()


def test_suv_header_names():
    header, rows = lesions.lesion_rows([], "SUV", with_score=True)
    assert "suv_peak [SUV]" in header and "tlg [SUV*mL]" in header and header[-1] == "score_max [-ln density]"
    assert rows == []
