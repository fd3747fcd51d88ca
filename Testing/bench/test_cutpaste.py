"""CutPaste: the pasted box, the training pairs, the Ledoit-Wolf Gaussian, dense patch scoring, 2D and 3D."""

import math

import numpy as np
import pytest
import torch

from iltm_bench import cutpaste


def test_ledoit_wolf_matches_scikit_learn():
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    for n, d in ((200, 8), (12, 20)):  # well-posed, and fewer samples than dimensions (strong shrinkage)
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
        mean, cov = cutpaste.ledoit_wolf(x)
        reference = sklearn_covariance.LedoitWolf().fit(x)
        assert np.allclose(mean, reference.location_) and np.allclose(cov, reference.covariance_)
    assert np.linalg.matrix_rank(cutpaste.ledoit_wolf(rng.normal(size=(12, 20)))[1]) == 20  # invertible


@pytest.mark.parametrize("shape", [(32, 32), (16, 12, 20)])
def test_a_paste_changes_one_box_with_content_of_the_same_scan(shape):
    rng = np.random.default_rng(1)
    image = rng.uniform(1.0, 2.0, size=tuple(2 * s for s in shape)).astype(np.float32)
    patch = np.zeros(shape, np.float32)
    for seed in range(20):
        out = cutpaste.cut_paste(image, patch, np.random.default_rng(seed))
        changed = out != patch
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(changed))
        assert changed[box].all()                                       # one solid box
        fraction = changed.sum() / patch.size
        assert 0.5 * cutpaste.CUT_VOLUME[0] <= fraction <= 2 * cutpaste.CUT_VOLUME[1]
        # brightness-jittered image content: within the image's range scaled by 1 +- BRIGHTNESS
        assert out[changed].min() >= 1.0 * (1 - cutpaste.BRIGHTNESS) - 1e-6
        assert out[changed].max() <= 2.0 * (1 + cutpaste.BRIGHTNESS) + 1e-6
    assert patch.max() == 0                                             # the input is not modified


@pytest.mark.parametrize("shape", [(32, 32), (16, 12, 20)])
def test_a_scar_is_a_thin_rotated_rod_of_the_same_scan(shape):
    rng = np.random.default_rng(11)
    image = rng.uniform(1.0, 2.0, size=tuple(2 * s for s in shape)).astype(np.float32)
    patch = np.zeros(shape, np.float32)
    longest = cutpaste.SCAR_LENGTH[1] * max(shape)
    widest = max(1.0, cutpaste.SCAR_WIDTH[1] * max(shape))
    rotated = 0
    for seed in range(20):
        out = cutpaste.scar(image, patch, np.random.default_rng(seed))
        changed = out != patch
        assert changed.any()
        # no more voxels than the largest rod (rotation's resampling adds at most a voxel's rim per side)
        assert changed.sum() <= (longest + 2) * (widest + 2) ** (len(shape) - 1)
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(changed))
        rotated += not changed[box].all()                               # a tilted rod does not fill its bounding box
        # interpolated, brightness-jittered image content (not darkened by the rotation's edges)
        assert out[changed].min() >= 1.0 * (1 - cutpaste.BRIGHTNESS) - 1e-6
        assert out[changed].max() <= 2.0 * (1 + cutpaste.BRIGHTNESS) + 1e-6
    assert rotated >= 5                                                 # small rods at small angles look straight
    assert patch.max() == 0


@pytest.mark.parametrize("variant, classes", [("binary", 2), ("scar", 2), ("3way", 3)])
def test_each_variant_has_its_pastes_and_classes(variant, classes):
    images = np.random.default_rng(12).uniform(size=(2, 24, 32)).astype(np.float32)
    patches, labels = cutpaste.training_pairs(images, (12, 16), np.random.default_rng(13), variant)
    assert labels.tolist() == list(range(classes)) * (2 * cutpaste.PATCHES_PER_IMAGE)
    assert patches.shape == (classes * 2 * cutpaste.PATCHES_PER_IMAGE, 12, 16)
    plain = patches[labels == 0]
    for label in range(1, classes):
        assert (patches[labels == label] != plain).any(axis=(1, 2)).all()      # every paste changed its patch
    net = cutpaste.build(2, (48, 64), [4, 8, 8], variant)
    assert net(torch.from_numpy(patches[:, None])).shape == (len(labels), classes)
    loss = cutpaste.loss(net, torch.from_numpy(images[:, None]), np.random.default_rng(14))
    assert loss.ndim == 0 and np.isfinite(float(loss.detach()))
    with pytest.raises(ValueError, match="unknown CutPaste variant 'four'"):
        cutpaste.build(2, (48, 64), [4, 8, 8], "four")


def test_training_pairs_are_each_patch_plain_and_pasted():
    images = np.random.default_rng(2).uniform(size=(3, 24, 32)).astype(np.float32)
    patches, labels = cutpaste.training_pairs(images, (12, 16), np.random.default_rng(3))
    assert patches.shape == (2 * 3 * cutpaste.PATCHES_PER_IMAGE, 12, 16)
    assert labels.tolist() == [0, 1] * (3 * cutpaste.PATCHES_PER_IMAGE)
    for plain, pasted in zip(patches[0::2], patches[1::2]):
        assert (plain != pasted).any() and (plain == pasted).mean() > 1 - 2 * cutpaste.CUT_VOLUME[1]


def test_dense_corners_cover_every_voxel_and_end_flush():
    shape, patch = (80, 24, 64), cutpaste.patch_shape((80, 24, 64))
    assert patch == (20, 8, 16)
    seen = np.zeros(shape, int)
    for corner in cutpaste.corners(shape, patch):
        seen[tuple(slice(c, c + p) for c, p in zip(corner, patch))] += 1
    assert seen.min() >= 1
    assert max(c[0] for c in cutpaste.corners(shape, patch)) == 80 - 20
    assert cutpaste.patch_shape((6, 12)) == (6, 8)                     # never below MIN_PATCH, never above the grid


@pytest.mark.parametrize("dims, shape", [(2, (32, 32)), (3, (16, 16, 16))])
def test_the_score_is_highest_where_patches_differ_from_the_training_patches(dims, shape):
    torch.manual_seed(0)
    net = cutpaste.build(dims, shape, [4, 8, 8]).eval()
    rng = np.random.default_rng(4)
    train = [rng.normal(1.0, 0.05, size=(1, *shape)).astype(np.float32) for _ in range(6)]
    density = cutpaste.fit_density(net, train, torch.device("cpu"))
    assert density["gde_mean"].shape == (8,) and density["gde_precision"].shape == (8, 8)  # the last stage's width
    test = rng.normal(1.0, 0.05, size=(1, *shape)).astype(np.float32)
    corner = tuple(slice(0, s // 4) for s in shape)                  # a bright block in one corner
    test[(0, *corner)] += 4.0
    score = cutpaste.score_map(net, test, density, torch.device("cpu"))
    assert score.shape == shape and np.isfinite(score).all()
    far = tuple(slice(3 * s // 4, s) for s in shape)
    assert score[corner].mean() > score[far].mean()
    plain = cutpaste.score_map(net, train[0], density, torch.device("cpu"))
    assert plain.max() < score.max()


@pytest.mark.parametrize("variant", ["binary", "scar"])
def test_the_classifier_learns_to_spot_pastes(variant):
    """A few hundred steps on smooth images: pasted boxes or scars (with a visible edge) become separable. (A
    scar that changed nothing would leave the loss at ln 2.)"""
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.stack([np.exp(-((yy - rng.uniform(8, 24)) ** 2 + (xx - rng.uniform(8, 24)) ** 2) / 60.0)
                       for _ in range(8)]).astype(np.float32)[:, None]
    net = cutpaste.build(2, (32, 32), [8, 16, 16], variant)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = cutpaste.loss(net, torch.from_numpy(images), rng)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-20:]) < 0.8 * math.log(2)                    # chance level is ln 2
