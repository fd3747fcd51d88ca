"""iltm.io: reading every supported format, bad-input messages that name the file, atomic writes, cohort listing."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iltm.errors import InputError
from iltm.io import (ImageRecord, check_images, image_dims, image_from_array, image_id, list_images, read_image,
                     read_label, write_image, write_png)


def _volume(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def _write(array: np.ndarray, path: Path, spacing=None, origin=None, is_vector=False) -> Path:
    img = sitk.GetImageFromArray(array, isVector=is_vector)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _write_dicom_series(array: np.ndarray, folder: Path, spacing=(0.8, 0.9, 2.5), origin=(1.0, 2.0, 3.0)) -> Path:
    """A minimal DICOM series (int16 slices with position and orientation tags), as SimpleITK's own example does."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    uid = f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1000) % 10**9}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in {
            "0008|0060": "PT", "0020|000d": uid + ".1", "0020|000e": uid + ".2", "0008|0018": f"{uid}.3.{k}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_reads_3d_formats_with_geometry(tmp_path, suffix):
    arr = _volume()
    path = _write(arr, tmp_path / f"scan{suffix}", spacing=(1.5, 2.0, 3.0), origin=(-4.0, 5.0, 6.0))
    img = read_image(path)
    assert img.GetPixelID() == sitk.sitkFloat32 and image_dims(img) == 3
    np.testing.assert_allclose(img.GetSpacing(), (1.5, 2.0, 3.0))
    np.testing.assert_allclose(img.GetOrigin(), (-4.0, 5.0, 6.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".jpg", ".bmp"])
def test_reads_2d_8bit_formats(tmp_path, suffix):
    arr = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (9, 1))  # smooth enough for JPEG
    path = _write(arr, tmp_path / f"photo{suffix}")
    img = read_image(path)
    assert image_dims(img) == 2 and img.GetPixelID() == sitk.sitkFloat32
    assert sitk.GetArrayFromImage(img).shape == arr.shape
    tolerance = 8 if suffix == ".jpg" else 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), arr, atol=tolerance)


def test_rgb_png_becomes_grey(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    img = read_image(_write(rgb, tmp_path / "rgb.png", is_vector=True))
    assert image_dims(img) == 2 and img.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-5)


def test_reads_dicom_series_folder(tmp_path):
    arr = (_volume((4, 6, 7)) * 10).astype(np.int16)
    folder = _write_dicom_series(arr, tmp_path / "series")
    img = read_image(folder)
    assert img.GetSize() == (7, 6, 4)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def test_single_slice_volume_is_2d(tmp_path):
    img = read_image(_write(_volume((1, 6, 7)), tmp_path / "slice.nii.gz", spacing=(0.5, 0.7, 3.0)))
    assert image_dims(img) == 2 and img.GetSize() == (7, 6)
    np.testing.assert_allclose(img.GetSpacing(), (0.5, 0.7))


def test_oblique_single_slice_gets_a_proper_2d_direction(tmp_path):
    img = sitk.GetImageFromArray(_volume((1, 6, 7)))
    img.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix())
    sitk.WriteImage(img, str(tmp_path / "oblique.nii.gz"))
    direction = np.array(read_image(tmp_path / "oblique.nii.gz").GetDirection()).reshape(2, 2)
    np.testing.assert_allclose(direction.T @ direction, np.eye(2), atol=1e-9)


def test_4d_with_one_time_point_is_3d(tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(_volume())])
    sitk.WriteImage(four_d, str(tmp_path / "t1.nii.gz"))
    assert read_image(tmp_path / "t1.nii.gz").GetSize() == (7, 6, 5)


# ---------------------------------------------------------------------------------------------- bad input


def _expect_input_error(path: Path, words: str) -> InputError:
    with pytest.raises(InputError) as info:
        read_image(path)
    assert info.value.where == str(path)
    assert words in info.value.problem, info.value.problem
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    _expect_input_error(tmp_path / "nope.nii.gz", "not found")


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect_input_error(tmp_path / "empty.nii.gz", "empty")


@pytest.mark.parametrize("name", ["corrupt.nii.gz", "corrupt.nrrd", "corrupt.png", "notes.xyz"])
def test_corrupt_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x13garbage, not an image" * 20)
    _expect_input_error(tmp_path / name, "SimpleITK cannot read it")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path, suffix):
    # ITK itself would fill the missing voxels with zeros without a word.
    whole = _write(_volume((10, 10, 10)), tmp_path / f"whole{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
    err = _expect_input_error(tmp_path / f"cut{suffix}", "SimpleITK cannot read it")
    assert "truncated" in err.problem or "cut short" in err.problem


def test_truncated_nifti_with_valid_gzip(tmp_path):
    raw = _write(_volume((10, 10, 10)), tmp_path / "whole.nii").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:2000]))
    _expect_input_error(tmp_path / "short.nii.gz", "truncated")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz", ".nii"])
def test_nan_and_inf_voxels(tmp_path, suffix):
    # (ITK's NIfTI reader turns them into 0 silently; iltm still finds them)
    arr = _volume()
    arr[0, 0, 0], arr[1, 2, 3], arr[4, 5, 6] = np.nan, np.inf, -np.inf
    _expect_input_error(_write(arr, tmp_path / f"nan{suffix}"), "contains 3 NaN/inf voxels")


def test_vector_volume(tmp_path):
    path = _write(_volume((4, 5, 6, 3)), tmp_path / "vector.nii.gz", is_vector=True)
    _expect_input_error(path, "vector image with 3 components")


def test_4d_volume(tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(_volume()), sitk.GetImageFromArray(_volume(seed=1))])
    sitk.WriteImage(four_d, str(tmp_path / "dynamic.nii.gz"))
    _expect_input_error(tmp_path / "dynamic.nii.gz", "is 4D")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "empty_series").mkdir()
    _expect_input_error(tmp_path / "empty_series", "no DICOM series")


# ---------------------------------------------------------------------------------------------- writing


def test_write_image_atomic_and_keeps_geometry(tmp_path):
    img = image_from_array(_volume())
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetDirection(sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix())
    out = write_image(img, tmp_path / "sub" / "out.nii.gz")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.nii.gz"]
    back = read_image(out)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous")

    def half_write(img, name, *args, **kwargs):
        Path(name).write_bytes(b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(InputError, match="disk full"):
        write_image(image_from_array(_volume()), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    monkeypatch.undo()
    with pytest.raises(InputError, match="out.unknownformat"):
        write_image(image_from_array(_volume()), tmp_path / "out.unknownformat")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_write_png_grey_and_rgb(tmp_path):
    grey = write_png(np.linspace(0, 1, 12 * 8).reshape(12, 8), tmp_path / "grey.png")
    rgb = write_png(np.random.default_rng(0).uniform(0, 1, (6, 7, 3)), tmp_path / "rgb.png")
    assert read_image(grey).GetSize() == (8, 12)
    assert read_image(rgb).GetSize() == (7, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "rgb.png"]


def test_read_label_is_binary(tmp_path):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 2, 3], arr[0, 0, 0] = 1.0, 0.2
    lab = read_label(_write(arr, tmp_path / "lab.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(lab).sum() == 1


# ---------------------------------------------------------------------------------------------- listing


def test_image_id_strips_extensions():
    assert image_id("a/b/ct.nii.gz") == "ct"
    assert image_id("x.v2.nrrd") == "x.v2"
    assert image_id("series_folder") == "series_folder"


def test_list_folder_with_images_and_labels(tmp_path):
    for name in ("b", "a", "c"):
        _write(_volume(), tmp_path / "images" / f"{name}.nii.gz")
    _write(_volume(), tmp_path / "labels" / "a.nii.gz")
    _write(_volume(), tmp_path / "labels" / "c.nrrd")  # paired by id when the name differs
    records = list_images(tmp_path)
    assert [r.id for r in records] == ["a", "b", "c"]
    assert records[0].label == tmp_path / "labels" / "a.nii.gz"
    assert records[1].label is None
    assert records[2].label == tmp_path / "labels" / "c.nrrd"


def test_list_plain_folder_with_dicom_subfolder(tmp_path):
    _write(_volume(), tmp_path / "one.mha")
    _write(np.zeros((5, 5), np.uint8), tmp_path / "two.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    _write_dicom_series(np.zeros((3, 4, 4)), tmp_path / "patient7")
    records = list_images(tmp_path)
    assert [r.id for r in records] == ["one", "patient7", "two"]
    assert records[1].image == tmp_path / "patient7"


def test_list_dicom_series_folder_itself(tmp_path):
    folder = _write_dicom_series(np.zeros((3, 4, 4)), tmp_path / "series")
    assert [r.image for r in list_images(folder)] == [folder]


def test_list_csv_relative_paths_and_unique_ids(tmp_path):
    _write(_volume(), tmp_path / "data" / "x" / "scan.nii.gz")
    _write(_volume(), tmp_path / "data" / "y" / "scan.nii.gz")
    _write(_volume(), tmp_path / "data" / "y" / "scan_lab.nii.gz")
    csv = tmp_path / "data" / "list.csv"
    csv.write_text("Image,label\nx/scan.nii.gz,\ny/scan.nii.gz,y/scan_lab.nii.gz\n\n")
    records = list_images(csv)
    assert [r.id for r in records] == ["scan", "scan_2"]
    assert records[0].image == (tmp_path / "data" / "x" / "scan.nii.gz").resolve() and records[0].label is None
    assert records[1].label == (tmp_path / "data" / "y" / "scan_lab.nii.gz").resolve()
    csv.write_text(f"id,image\np1,{tmp_path / 'data' / 'x' / 'scan.nii.gz'}\n")
    assert list_images(csv)[0].id == "p1"


def test_list_single_file(tmp_path):
    path = _write(_volume(), tmp_path / "lonely.nrrd")
    assert list_images(path) == [ImageRecord("lonely", path, None)]


@pytest.mark.parametrize("case", ["empty_folder", "missing", "csv_without_image_column", "empty_csv"])
def test_list_bad_sources(tmp_path, case):
    if case == "empty_folder":
        source = tmp_path / "empty"
        source.mkdir()
        (source / "readme.txt").write_text("no images here")
    elif case == "missing":
        source = tmp_path / "absent"
    elif case == "csv_without_image_column":
        source = tmp_path / "list.csv"
        source.write_text("path,label\na.nii.gz,\n")
    else:
        source = tmp_path / "list.csv"
        source.write_text("")
    with pytest.raises(InputError) as info:
        list_images(source)
    assert str(source) in info.value.where


# ---------------------------------------------------------------------------------------------- checking


def _bad_cohort(tmp_path: Path) -> Path:
    folder = tmp_path / "cohort"
    _write(_volume(), folder / "good1.nii.gz")
    _write(_volume(seed=1), folder / "good2.nrrd")
    _write(_volume(seed=2), folder / "good3.mha")
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "corrupt.nii.gz").write_bytes(b"definitely not gzip" * 10)
    nan = _volume()
    nan[2, 2, 2] = np.nan
    _write(nan, folder / "nan.nii.gz")
    _write(_volume((6, 7)), folder / "flat.nii.gz")  # 2D among 3D
    return folder


def test_check_images_lists_every_problem_at_once(tmp_path):
    folder = _bad_cohort(tmp_path)
    records = list_images(folder)
    records.append(ImageRecord("gone", folder / "gone.nii.gz"))
    good, problems = check_images(records)
    assert sorted(r.id for r in good) == ["good1", "good2", "good3"]
    where = {Path(path).name: message for path, message in problems}
    assert set(where) == {"corrupt.nii.gz", "empty.nii.gz", "flat.nii.gz", "nan.nii.gz", "gone.nii.gz"}
    assert "empty" in where["empty.nii.gz"]
    assert "SimpleITK cannot read it" in where["corrupt.nii.gz"]
    assert "NaN/inf" in where["nan.nii.gz"]
    assert where["flat.nii.gz"] == "is 2D but most inputs are 3D"
    assert "not found" in where["gone.nii.gz"]
    # skipping changes nothing in what is found; the caller decides whether to stop
    assert check_images(records, skip_unreadable=True) == (good, problems)


def test_check_images_against_model_dims_and_labels(tmp_path):
    a = _write(_volume(), tmp_path / "a.nii.gz")
    b = _write(_volume((6, 7)), tmp_path / "b.nii.gz")
    lab_ok = _write(np.zeros((5, 6, 7), np.uint8), tmp_path / "a_lab.nii.gz")
    lab_bad = _write(np.zeros((5, 6, 8), np.uint8), tmp_path / "a_badlab.nii.gz")
    good, problems = check_images([ImageRecord("a", a, lab_ok), ImageRecord("b", b)], spatial_dims=2)
    assert [r.id for r in good] == ["b"]
    assert problems == [(str(a), "is 3D but the model is 2D")]
    good, problems = check_images([ImageRecord("a", a, lab_bad)])
    assert not good and problems[0].path == str(lab_bad) and "differs" in problems[0].message
