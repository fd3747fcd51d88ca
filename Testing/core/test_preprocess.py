"""iltm.preprocess: resampling, intensity normalisation, crop/pad, the exact way back to the input grid, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iltm.config import DataConfig
from iltm.errors import InputError
from iltm.preprocess import GeometryInfo, Preprocessor, augmentation

torch.set_num_threads(1)


def _smooth_image(size_xyz, spacing, origin, direction, offset=2.0) -> sitk.Image:
    """A smooth field on a rotated, anisotropic grid, defined in physical space (so resampling can be checked)."""
    img = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size_xyz], indexing="ij"), -1).reshape(-1, len(size_xyz))
    d = np.array(direction).reshape(len(size_xyz), len(size_xyz))
    phys = np.array(origin) + (idx * np.array(spacing)) @ d.T
    values = offset + np.sin(phys[:, 0] / 9.0) + np.cos(phys[:, 1] / 11.0)
    if len(size_xyz) == 3:
        values += phys[:, 2] / 40.0
    arr = values.reshape(size_xyz).transpose()  # (x, y, z) -> numpy (z, y, x)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out


def _rotation_3d() -> tuple[float, ...]:
    return sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()


def _assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [4, 8])
def test_round_trip_rotated_anisotropic_resampled_3d(factor):
    img = _smooth_image((17, 13, 11), (1.3, 0.9, 2.7), (-10.0, 5.0, 33.0), _rotation_3d())
    pre = Preprocessor(DataConfig(target_spacing=[1.5, 1.5, 1.5], intensity="none"), factor)
    array, info = pre.forward(img)
    assert array.dtype == np.float32 and array.shape[0] == 1
    assert all(n % factor == 0 for n in array.shape[1:])
    assert info.resampled and info.grid_spacing == [1.5, 1.5, 1.5]
    assert array.shape[1:] == tuple(reversed(info.spatial_size))  # numpy (z, y, x) order
    # the info survives JSON, as it does in a run folder
    info = GeometryInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    back = pre.inverse(array[0], info)
    _assert_same_grid(back, img)
    error = np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(img))
    assert error.max() < 0.08 and error.mean() < 0.02  # linear interpolation twice on a field of range ~4


def test_round_trip_2d_rotated_anisotropic():
    angle = 0.4
    direction = (np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle))
    img = _smooth_image((23, 15), (0.7, 1.9), (3.0, -8.0), direction)
    pre = Preprocessor(DataConfig(spatial_dims=2, target_spacing=[1.0, 1.0], intensity="none"), 4)
    array, info = pre.forward(img)
    assert info.grid_size == [17, 29]  # enough 1 mm voxels to cover 16.1 x 28.5 mm
    assert array.shape == (1, 32, 20)
    back = pre.inverse(array, info)  # (1, *spatial) accepted too
    _assert_same_grid(back, img)
    error = np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(img))
    assert error.max() < 0.08


def test_nearest_inverse_keeps_a_mask():
    img = _smooth_image((21, 19, 15), (1.1, 0.8, 2.2), (0.0, 0.0, 0.0), _rotation_3d())
    pre = Preprocessor(DataConfig(target_spacing=[1.4, 1.4, 1.4], intensity="none"), 4)
    array, info = pre.forward(img)
    blob = np.zeros(info.array_shape, np.float32)
    blob[4:12, 5:13, 6:14] = 1
    back = pre.inverse(blob, info, interpolator="nearest")
    values = np.unique(sitk.GetArrayFromImage(back))
    assert set(values.tolist()) <= {0.0, 1.0} and 1.0 in values


def test_without_resampling_pad_is_exact():
    img = _smooth_image((13, 10, 7), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), _rotation_3d())
    pre = Preprocessor(DataConfig(intensity="none"), 4)
    array, info = pre.forward(img)
    assert not info.resampled and array.shape == (1, 8, 12, 16)
    assert info.offset == [-2, -1, -1]  # centred: pad (2, 1) in x, (1, 1) in y, (1, 0) in z
    back = pre.inverse(array[0], info)
    _assert_same_grid(back, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_spatial_size_crops_and_pads_centred():
    arr = np.arange(9 * 12, dtype=np.float32).reshape(9, 12)  # numpy (y, x): x = 12, y = 9
    img = sitk.GetImageFromArray(arr)
    pre = Preprocessor(DataConfig(spatial_size=[8, 12], intensity="none"), 4)
    array, info = pre.forward(img)
    assert array.shape == (1, 12, 8)
    np.testing.assert_array_equal(array[0, 2:11], arr[:, 2:10])  # x cropped by 2 each side, y padded (2, 1)
    assert np.all(array[0, :2] == 0) and np.all(array[0, 11:] == 0)
    back = sitk.GetArrayFromImage(pre.inverse(array[0], info, fill=-1.0))
    np.testing.assert_array_equal(back[:, 2:10], arr[:, 2:10])
    assert np.all(back[:, :2] == -1.0) and np.all(back[:, 10:] == -1.0)  # never seen by the network


def test_intensity_modes_and_recorded_clip():
    arr = np.linspace(-5, 100, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    img = sitk.GetImageFromArray(arr)
    a, info = Preprocessor(DataConfig(intensity="pet", clip_percentile=90.0), 4).forward(img)
    high = float(np.percentile(arr, 90.0))
    assert info.intensity_high == pytest.approx(high) and info.intensity_low == 0.0
    assert a.min() == 0.0 and a.max() == pytest.approx(1.0)
    np.testing.assert_allclose(a[0], np.clip(arr, 0, high) / high, rtol=1e-6)
    a, info = Preprocessor(DataConfig(intensity="pet", clip_value=50.0), 4).forward(img)
    assert info.intensity_high == 50.0
    np.testing.assert_allclose(a[0], np.clip(arr, 0, 50) / 50, rtol=1e-6)
    a, _ = Preprocessor(DataConfig(intensity="unit8bit"), 4).forward(img * 3)
    np.testing.assert_allclose(a[0], np.clip(arr * 3 / 255, 0, 1), rtol=1e-6)
    a, _ = Preprocessor(DataConfig(intensity="8bit"), 4).forward(img * 3)
    np.testing.assert_allclose(a[0], np.clip(arr * 3, 0, 255), rtol=1e-6)
    a, info = Preprocessor(DataConfig(intensity="none"), 4).forward(img)
    np.testing.assert_array_equal(a[0], arr)
    assert info.intensity_high is None
    zero, info = Preprocessor(DataConfig(intensity="pet"), 4).forward(img * 0)
    assert np.all(zero == 0) and np.all(np.isfinite(zero))


def test_too_small_for_downsampling():
    img = sitk.GetImageFromArray(np.ones((20, 7, 20), np.float32))
    with pytest.raises(InputError) as info:
        Preprocessor(DataConfig(), 8).forward(img, where="scan.nii.gz")
    assert info.value.where == "scan.nii.gz"
    assert "too small for 3 downsamplings: needs at least 8 voxels per axis, has 20x7x20" in info.value.problem


def test_too_small_after_resampling():
    img = sitk.GetImageFromArray(np.ones((16, 16), np.float32))
    with pytest.raises(InputError, match="after resampling"):
        Preprocessor(DataConfig(target_spacing=[4.0, 4.0]), 8).forward(img)


@pytest.mark.parametrize("model_dims, image_shape, words", [(2, (5, 8, 8), "is 3D but the model is 2D"),
                                                            (3, (8, 8), "is 2D but the model is 3D")])
def test_dimensionality_mismatch(model_dims, image_shape, words):
    img = sitk.GetImageFromArray(np.ones(image_shape, np.float32))
    with pytest.raises(InputError) as info:
        Preprocessor(DataConfig(spatial_dims=model_dims), 4).forward(img, where="in.nrrd")
    assert info.value.where == "in.nrrd" and info.value.problem == words


@pytest.mark.parametrize("values", [dict(intensity="log"), dict(spatial_size=[30, 32])])
def test_bad_settings(values):
    with pytest.raises(InputError):
        Preprocessor(DataConfig(**values), 4)


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentation_is_seeded_and_keeps_shape(dims):
    cfg = DataConfig(augment_prob=1.0)
    shape = (1, 16, 16) if dims == 2 else (1, 12, 12, 16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a = augmentation(cfg, dims, seed=3)(x)
    b = Preprocessor(cfg, 4).augmentation(dims, seed=3)(x)
    c = augmentation(cfg, dims).set_random_state(4)(x)
    assert type(a) is torch.Tensor and a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)


def test_augmentation_off_is_identity():
    x = torch.rand(1, 12, 12, 12)
    assert torch.equal(augmentation(DataConfig(augment=False), 3, seed=0)(x), x)
    assert torch.equal(augmentation(DataConfig(augment_prob=0.0), 3, seed=0)(x), x)


def test_augmentation_is_small():
    # a ramp stays close to a ramp: small rotation/scale/translation and a gentle elastic field
    ramp = torch.linspace(0, 1, 24).repeat(24, 24, 1)[None]  # (1, 24, 24, 24), varies along the last axis
    out = augmentation(DataConfig(augment_prob=1.0), 3, seed=0)(ramp)
    inner = (slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert (out[inner] - ramp[inner]).abs().mean() < 0.1
