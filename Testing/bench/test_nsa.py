"""NSA's synthetic anomalies: the exact Poisson solver, the blending, the logistic labels, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iltm_bench import nsa


def laplacian_inside(h: np.ndarray) -> np.ndarray:
    lap = sum(np.roll(h, 1, a) + np.roll(h, -1, a) - 2 * h for a in range(h.ndim))
    return lap[(slice(1, -1),) * h.ndim]


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 5), (3, 3)])
def test_harmonic_fill_reproduces_a_linear_function_from_its_surface(shape):
    grid = np.indices(shape).astype(float)
    linear = 0.3 + sum((i + 1) * 0.1 * g for i, g in enumerate(grid))
    shell = linear.copy()
    shell[(slice(1, -1),) * len(shape)] = 99.0  # the inside must not be read
    assert np.allclose(nsa.harmonic_fill(shell), linear)


def test_harmonic_fill_solves_laplace_with_the_given_surface():
    shell = np.random.default_rng(0).normal(size=(6, 8, 7))
    h = nsa.harmonic_fill(shell)
    assert np.abs(laplacian_inside(h)).max() < 1e-10
    surface = np.ones(shell.shape, bool)
    surface[1:-1, 1:-1, 1:-1] = False
    assert np.array_equal(h[surface], shell[surface])
    with pytest.raises(ValueError, match="3 voxels"):
        nsa.harmonic_fill(np.zeros((2, 5)))


def test_poisson_blend_keeps_the_sources_gradients_and_the_targets_surface():
    rng = np.random.default_rng(1)
    target, source = rng.random((9, 11)), rng.random((9, 11))
    blended = nsa.poisson_blend(target, source)
    assert np.allclose(laplacian_inside(blended), laplacian_inside(source))
    assert np.allclose(blended[0], target[0]) and np.allclose(blended[:, -1], target[:, -1])
    # A source that is the target plus a constant blends into the target itself: an invisible patch.
    assert np.allclose(nsa.poisson_blend(target, target + 0.5), target)


@pytest.mark.parametrize("shape", [(9, 11), (6, 8, 7)])
def test_mixed_blend_follows_the_stronger_gradient_of_each_voxel_pair(shape):
    rng = np.random.default_rng(11)
    target, source = rng.random(shape), rng.random(shape)
    mixed = nsa.poisson_blend(target, source, "mixed")
    surface = np.ones(shape, bool)
    surface[(slice(1, -1),) * len(shape)] = False
    assert np.array_equal(mixed[surface], target[surface])
    # Its Laplacian inside is the divergence of the guidance that picks, edge by edge, the larger difference.
    expected = 0.0
    for axis in range(len(shape)):
        ds, dt = np.diff(source, axis=axis), np.diff(target, axis=axis)
        guide = np.where(np.abs(ds) >= np.abs(dt), ds, dt)         # guide[k]: the edge from voxel k to k + 1
        second = np.diff(guide, axis=axis)                         # at voxels 1 .. n - 2 along this axis
        expected = expected + second[tuple(slice(None) if a == axis else slice(1, -1) for a in range(len(shape)))]
    assert np.allclose(laplacian_inside(mixed), expected)
    # It is neither the plain blend nor the scan, and it reduces to each where one side has no edges.
    assert not np.allclose(mixed, nsa.poisson_blend(target, source)) and not np.allclose(mixed, target)
    flat = np.full(shape, 0.3)
    assert np.allclose(nsa.poisson_blend(target, flat, "mixed"), target)   # a flat patch leaves the scan's edges
    assert np.allclose(nsa.poisson_blend(flat, source, "mixed"), nsa.poisson_blend(flat, source))
    with pytest.raises(ValueError, match="gradients must be one of source, mixed"):
        nsa.poisson_blend(target, source, "average")


def test_mixed_gradients_keep_a_scans_edge_that_a_source_blend_wipes_out():
    # A sharp step in the scan, a smooth patch: the source blend smooths the step away, the mixed blend keeps it.
    target = np.zeros((12, 12))
    target[:, 6:] = 1.0
    source = np.random.default_rng(3).normal(0, 0.01, (12, 12))
    step = {g: np.abs(np.diff(nsa.poisson_blend(target, source, g)[4:8], axis=1)[:, 5]).mean()
            for g in ("source", "mixed")}
    assert step["mixed"] > 0.9 and step["source"] < 0.5, step


@pytest.mark.parametrize("shape", [(4, 48, 40), (3, 24, 16, 20)])
def test_synthesize_labels_follow_the_change(shape):
    images = np.random.default_rng(2).random(shape).astype(np.float32)
    changed, labels = nsa.synthesize(images, np.random.default_rng(3))
    assert changed.shape == labels.shape == images.shape and changed.dtype == labels.dtype == np.float32
    assert 0.0 <= labels.min() and labels.max() <= 1.0
    change = np.abs(changed - images)
    assert (change > 0).any(), "no patch in any image"
    assert (labels[change == 0] < 0.01).all()
    assert (labels[change > 2 * nsa.LABEL_OFFSET] > 0.98).all()
    again = nsa.synthesize(images, np.random.default_rng(3))
    assert np.array_equal(again[0], changed) and np.array_equal(again[1], labels)


def test_a_3d_box_fills_about_as_much_of_a_volume_as_a_2d_box_of_an_image():
    rng = np.random.default_rng(9)
    area = np.mean([np.prod(nsa.box_sides(rng, (60, 60))) / 60 ** 2 for _ in range(4000)])
    volume = np.mean([np.prod(nsa.box_sides(rng, (60, 60, 60))) / 60 ** 3 for _ in range(4000)])
    assert area == pytest.approx(np.mean(nsa.PATCH_SIDE) ** 2, rel=0.15)   # 2D: the sides as drawn
    assert volume == pytest.approx(area, rel=0.25)


@pytest.mark.parametrize("scale", [0.7, 1.3])
def test_a_resized_source_is_a_box_of_another_size_resampled_to_the_target_box(scale):
    shape, box = (40, 36, 44), (10, 8, 12)
    ramp = np.indices(shape).astype(float)[2] * 0.5                # intensity grows by 0.5 per voxel along x
    patch = nsa.resized_source(ramp, box, np.random.default_rng(0), bounds=(scale, scale))
    assert patch.shape == box
    # The source box was round(12 * scale) voxels along x, squeezed or stretched to 12: the slope scales with it.
    slope = np.diff(patch[..., 2:-2], axis=-1).mean()              # away from the clamped edges
    assert slope == pytest.approx(0.5 * round(12 * scale) / 12, rel=0.05)
    same = nsa.resized_source(ramp, box, np.random.default_rng(0), bounds=(1.0, 1.0))
    assert np.allclose(np.diff(same, axis=-1), 0.5)                # scale 1: a plain cut


def test_resizing_changes_the_synthetic_anomalies_and_keeps_the_labels_consistent():
    images = np.random.default_rng(7).random((3, 40, 48)).astype(np.float32)
    plain = nsa.synthesize(images, np.random.default_rng(8))
    resized = nsa.synthesize(images, np.random.default_rng(8), resize=True)
    assert not np.array_equal(plain[0], resized[0])
    changed, labels = resized
    change = np.abs(changed - images)
    assert (change > 0).any() and (labels[change == 0] < 0.01).all()
    assert (labels[change > 2 * nsa.LABEL_OFFSET] > 0.98).all()


def test_mixed_gradients_change_the_synthetic_anomalies_and_keep_the_labels_consistent():
    images = np.random.default_rng(7).random((3, 40, 48)).astype(np.float32)
    plain = nsa.synthesize(images, np.random.default_rng(8))
    mixed = nsa.synthesize(images, np.random.default_rng(8), gradients="mixed")
    assert not np.array_equal(plain[0], mixed[0])
    changed, labels = mixed
    change = np.abs(changed - images)
    assert (change > 0).any() and (labels[change == 0] < 0.01).all()
    assert (labels[change > 2 * nsa.LABEL_OFFSET] > 0.98).all()


def test_a_single_image_takes_patches_from_itself_and_tiny_images_are_refused():
    image = np.random.default_rng(4).random((1, 32, 32)).astype(np.float32)
    changed = [nsa.synthesize(image, np.random.default_rng(s))[0] for s in range(8)]
    assert any(not np.array_equal(c, image) for c in changed)
    with pytest.raises(ValueError, match="too small"):
        nsa.synthesize(np.zeros((2, 2, 8), np.float32), np.random.default_rng(0))


def test_intensity_range_scales_the_labels():
    images = np.random.default_rng(5).random((2, 32, 32)).astype(np.float32)
    _, unit = nsa.synthesize(images, np.random.default_rng(6))
    changed, eight_bit = nsa.synthesize(images * 255, np.random.default_rng(6), intensity_range=255.0)
    assert np.allclose(unit, eight_bit, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_loss_is_a_differentiable_scalar(dims):
    torch.manual_seed(0)
    model = nsa.build(dims, [4, 8])
    x = torch.rand(2, 1, *([16] * dims))
    value = nsa.loss(model, x, np.random.default_rng(0))
    value.backward()
    assert value.ndim == 0 and float(value.detach()) > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
