"""Per-voxel KDE (iltm.kde) against scipy.stats.gaussian_kde and hand-derived values."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from iltm import kde

torch.set_num_threads(1)


def _samples(shape, num_samples=30, seed=0):
    rng = np.random.default_rng(seed)
    # Per-voxel location and spread differ, so a mix-up of voxels would show.
    loc = rng.uniform(0, 1, shape)
    spread = rng.uniform(0.05, 0.3, shape)
    samples = loc + spread * rng.standard_normal((num_samples, *shape))
    image = loc + rng.uniform(-0.5, 0.5, shape)
    return samples, image


def _scipy_log_density(samples, image, eps):
    reference = np.empty(image.shape)
    for index in np.ndindex(image.shape):
        values = samples[(slice(None), *index)]
        if eps == 0:
            fitted = stats.gaussian_kde(values, bw_method="silverman")
        else:
            sigma = values.std(ddof=1)
            h = (4 * sigma**5 / (3 * values.size)) ** 0.2 + eps
            fitted = stats.gaussian_kde(values, bw_method=h / sigma)  # scipy's bandwidth is factor * sigma
        reference[index] = fitted.logpdf(image[index])[0]
    return reference


def test_bandwidth_is_scipy_silverman_in_1d():
    values = np.random.default_rng(1).normal(size=40)
    fitted = stats.gaussian_kde(values, bw_method="silverman")
    sigma = values.std(ddof=1)
    expected = fitted.factor * sigma
    got = kde.silverman_bandwidth(torch.tensor(sigma, dtype=torch.float64), values.size).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx((4 * sigma**5 / (3 * values.size)) ** 0.2, rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_matches_scipy_silverman_without_eps(shape):
    samples, image = _samples(shape)
    got = kde.log_density(samples, image, eps=0.0)
    np.testing.assert_allclose(got, _scipy_log_density(samples, image, 0.0), rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 3), (2, 2, 3)])
def test_matches_scipy_with_eps_bandwidth(shape):
    samples, image = _samples(shape, num_samples=25, seed=2)
    got = kde.log_density(samples, image, eps=0.05)
    np.testing.assert_allclose(got, _scipy_log_density(samples, image, 0.05), rtol=1e-6)
    # eps must actually change the answer, or the comparison above proves nothing about it.
    assert not np.allclose(got, kde.log_density(samples, image, eps=0.0), rtol=1e-3)


def test_far_from_every_sample_stays_finite():
    # Two samples at 0 and 1: sigma = 1/sqrt(2). At x = 100 exp(-z^2/2) underflows to 0 for both kernels,
    # so a naive log(sum(exp)) gives -inf; logsumexp keeps the dominant (nearest, x_n = 1) term.
    samples = np.array([[[0.0]], [[1.0]]])
    image = np.array([[100.0]])
    h = (1 / math.sqrt(2)) * (4 / 6) ** 0.2
    nearest, farther = -0.5 * (99 / h) ** 2, -0.5 * (100 / h) ** 2
    expected = nearest + math.log1p(math.exp(farther - nearest)) - math.log(2 * h) - 0.5 * math.log(2 * math.pi)
    got = kde.log_density(samples, image, eps=0.0)
    assert np.isfinite(got).all()
    assert got[0, 0] == pytest.approx(expected, rel=1e-12)


def test_chunked_equals_unchunked():
    samples, image = _samples((6, 7, 5), num_samples=12, seed=3)
    whole = kde.log_density(samples, image, eps=0.05, chunk_voxels=10**6)
    chunked = kde.log_density(samples, image, eps=0.05, chunk_voxels=7)  # 210 voxels: last chunk is partial
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_equals_numpy_and_keeps_types(dtype):
    samples, image = _samples((4, 5), num_samples=16, seed=4)
    samples, image = samples.astype(dtype), image.astype(dtype)
    from_numpy = kde.log_density(samples, image, eps=0.05)
    from_torch = kde.log_density(torch.from_numpy(samples), torch.from_numpy(image), eps=0.05)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == dtype
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.from_numpy(image).dtype
    assert from_torch.device == torch.device("cpu")
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_float32_close_to_float64_reference():
    samples, image = _samples((3, 3, 3), num_samples=20, seed=5)
    got = kde.log_density(samples.astype(np.float32), image.astype(np.float32), eps=0.05)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, kde.log_density(samples, image, eps=0.05), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_device():
    samples, image = _samples((4, 4, 4), num_samples=10, seed=6)
    got = kde.log_density(torch.from_numpy(samples).cuda(), torch.from_numpy(image).cuda(), eps=0.05)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), kde.log_density(samples, image, eps=0.05), rtol=1e-10)


def test_rejects_bad_shapes_and_single_sample():
    samples, image = _samples((3, 4), num_samples=5)
    with pytest.raises(ValueError):
        kde.log_density(samples, image.T, eps=0.05)
    with pytest.raises(ValueError):
        kde.log_density(samples[:1], image, eps=0.05)


def test_binary_map_is_strictly_below_tau():
    log_tau = math.log(0.005)  # about -5.298
    log_f = np.array([[-7.0, log_tau - 1e-9, log_tau], [log_tau + 1e-9, -1.0, 2.0]])
    expected = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)  # strictly f < tau
    mask = kde.binary_map(log_f, density_threshold=0.005)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    mask_t = kde.binary_map(torch.from_numpy(log_f), density_threshold=0.005)
    assert mask_t.dtype == torch.uint8
    np.testing.assert_array_equal(mask_t.numpy(), expected)
    # A larger tau flags more voxels: f < 0.5 <=> log f < -0.693.
    np.testing.assert_array_equal(kde.binary_map(log_f, 0.5), np.array([[1, 1, 1], [1, 1, 0]], dtype=np.uint8))
