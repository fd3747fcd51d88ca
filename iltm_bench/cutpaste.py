"""CutPaste (Li et al., CVPR 2021), the second self-supervised baseline, patch-level, in 2D and 3D.

A patch classifier learns to tell patches of training scans from the same patches with a box cut from elsewhere in
the scan pasted in (brightness jittered). Its encoder's features of normal patches are then modelled by one
Gaussian (the paper's GDE: mean and a Ledoit-Wolf shrunk covariance), fitted on every patch of the training scans.
A test patch's anomaly score is its Mahalanobis distance to that Gaussian; a voxel's score is the mean over the
patches that cover it, smoothed with a Gaussian of a quarter patch (the paper's receptive-field upsampling).
Training scans that hold lesions put lesion patches into the Gaussian, which is what the contamination sweep
measures.

Three pretext tasks, as in the paper (``variant``): ``"binary"`` (plain vs. a pasted box; the default), ``"scar"``
(plain vs. a pasted scar: a thin rod of the scan, rotated) and ``"3way"`` (plain vs. box vs. scar, the paper's
best). Left out from the paper: colour jitter beyond brightness (PET has one channel) and the ImageNet-pretrained
ResNet-18 (a small MONAI ResNet is trained from scratch here).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from .nsa import box_slices, random_corner

PATCH_FRACTION = 0.25       # patch side per axis as a fraction of the model grid (the paper: 64 of 256 pixels)
MIN_PATCH = 8               # voxels per axis, so that the encoder's three stride-2 stages keep at least one
PATCHES_PER_IMAGE = 4       # random patch positions per training image and step, each also seen with a paste
CUT_VOLUME = (0.02, 0.15)   # pasted box, as a fraction of the patch's voxels (the paper's area ratio)
CUT_ASPECT = (0.3, 3.3)     # ratio of the box's sides (the paper's aspect ratio), drawn per axis
BRIGHTNESS = 0.1            # the pasted box's intensities are scaled by 1 +- this
# The scar: a rod SCAR_LENGTH of the patch long (one random axis) and SCAR_WIDTH wide (the other axes), rotated by
# up to SCAR_ANGLE degrees in a random plane; the paper's 10-25 by 2-16 pixels on 64-pixel patches, +-45 degrees.
SCAR_LENGTH = (10 / 64, 25 / 64)
SCAR_WIDTH = (2 / 64, 16 / 64)
SCAR_ANGLE = 45.0
VARIANTS = {"binary": ("cutpaste",), "scar": ("scar",), "3way": ("cutpaste", "scar")}  # the pastes of each task
STRIDE_FRACTION = 0.25      # dense scoring: patch stride per axis as a fraction of the patch
SCORE_BATCH = 64            # patches per forward pass when scoring


def patch_shape(in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The classifier's patch (numpy order) for a model grid ``in_shape``: a quarter of each axis, at least
    MIN_PATCH (and at most the axis)."""
    return tuple(min(n, max(MIN_PATCH, int(n * PATCH_FRACTION))) for n in in_shape)


class CutPasteNet(nn.Module):
    """MONAI ResNet encoder (basic blocks, one per stage) + a two-layer head that classifies pasted vs. not.

    Args:
        spatial_dims: 2 or 3.
        in_shape: the model grid (numpy order); patches are ``patch_shape(in_shape)``.
        channels: feature channels of the stages (three or more; the last is repeated to make MONAI's four).
        variant: the pretext task (a key of VARIANTS); ``"3way"`` has three classes, the others two.
    """

    def __init__(self, spatial_dims: int, in_shape: tuple[int, ...], channels: list[int], variant: str = "binary"):
        super().__init__()
        from monai.networks.nets import ResNet

        planes = (list(channels) + [channels[-1]] * 4)[:4]
        if variant not in VARIANTS:
            raise ValueError(f"unknown CutPaste variant '{variant}' (choose from {', '.join(VARIANTS)})")
        self.spatial_dims, self.in_shape, self.variant = spatial_dims, tuple(in_shape), variant
        self.patch_shape = patch_shape(self.in_shape)
        self.encoder = ResNet("basic", [1, 1, 1, 1], planes, spatial_dims=spatial_dims, n_input_channels=1,
                              conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, feed_forward=False)
        width = planes[-1]
        classes = 1 + len(VARIANTS[variant])
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, classes))

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 1, *patch) -> (N, width) pooled encoder features."""
        return self.encoder(patches)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 1, *patch) -> (N, classes) logits: not pasted, then each of the variant's pastes."""
        return self.head(self.embed(patches))


def build(spatial_dims: int, in_shape: tuple[int, ...], channels: list[int], variant: str = "binary"
          ) -> CutPasteNet:
    return CutPasteNet(spatial_dims, in_shape, channels, variant)


# -- the pretext task --------------------------------------------------------------------------------------------

def _cut_box(rng: np.random.Generator, patch: tuple[int, ...]) -> tuple[int, ...]:
    """Sides of a box of CUT_VOLUME of the patch, sides in ratios within CUT_ASPECT, each fitting the patch."""
    volume = rng.uniform(*CUT_VOLUME) * math.prod(patch)
    logs = rng.uniform(math.log(CUT_ASPECT[0]), math.log(CUT_ASPECT[1]), size=len(patch)) / 2
    logs -= logs.mean()
    side = volume ** (1.0 / len(patch))
    return tuple(int(min(p - 1, max(1, round(side * math.exp(r))))) for p, r in zip(patch, logs))


def cut_paste(image: np.ndarray, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``patch`` with a box cut from a random place of ``image`` (its whole scan) pasted at a random place.

    Args:
        image: (*spatial) the scan the patch comes from.
        patch: (*patch) array.

    Returns:
        a new (*patch) array; the box's intensities are scaled by 1 +- BRIGHTNESS.
    """
    box = _cut_box(rng, patch.shape)
    src = box_slices(random_corner(rng, image.shape, box), box)
    dst = box_slices(random_corner(rng, patch.shape, box), box)
    out = patch.copy()
    out[dst] = image[src] * rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    return out


def scar(image: np.ndarray, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``patch`` with a scar pasted at a random place: a thin rod cut from a random place of ``image``, its
    intensities scaled by 1 +- BRIGHTNESS, rotated by up to SCAR_ANGLE degrees in a random plane.

    Args:
        image: (*spatial) the scan the patch comes from.
        patch: (*patch) array, every side at least 2.

    Returns:
        a new (*patch) array.
    """
    from scipy import ndimage

    ndim = patch.ndim
    long_axis = int(rng.integers(ndim))
    width = rng.uniform(*SCAR_WIDTH)
    rod = tuple(int(min(p - 1, n, max(2, round(rng.uniform(*SCAR_LENGTH) * p)))) if a == long_axis
                else int(min(p - 1, n, max(1, round(width * p))))
                for a, (p, n) in enumerate(zip(patch.shape, image.shape)))
    content = image[box_slices(random_corner(rng, image.shape, rod), rod)].astype(np.float64)
    content = content * rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    plane = (long_axis, int((long_axis + 1 + rng.integers(ndim - 1)) % ndim))
    angle = rng.uniform(-SCAR_ANGLE, SCAR_ANGLE)
    inside = ndimage.rotate(np.ones(rod), angle, axes=plane, reshape=True, order=1) > 0.5
    if inside.any():
        content = ndimage.rotate(content, angle, axes=plane, reshape=True, order=1, mode="nearest")
    else:  # a rod too thin to survive the rotation's resampling stays axis-aligned
        inside = np.ones(rod, bool)
    margins = [(s - min(s, p)) // 2 for s, p in zip(inside.shape, patch.shape)]  # a rotated rod wider than the
    keep = tuple(slice(m, m + min(s, p)) for m, s, p in zip(margins, inside.shape, patch.shape))  # patch: its middle
    inside, content = inside[keep], content[keep]
    dst = box_slices(random_corner(rng, patch.shape, inside.shape), inside.shape)
    out = patch.copy()
    window = out[dst]
    window[inside] = content[inside]
    return out


PASTES = {"cutpaste": cut_paste, "scar": scar}


def training_pairs(images: np.ndarray, patch: tuple[int, ...], rng: np.random.Generator, variant: str = "binary"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """PATCHES_PER_IMAGE random patches of each image, each as it is (label 0) and with each of the variant's
    pastes (labels 1, 2: see VARIANTS).

    Args:
        images: (B, *spatial).

    Returns:
        (patches (N, *patch) float32, labels (N,) int64), N = (1 + pastes) x B x PATCHES_PER_IMAGE.
    """
    pastes = [PASTES[name] for name in VARIANTS[variant]]
    patches, labels = [], []
    for image in images:
        for _ in range(PATCHES_PER_IMAGE):
            at = box_slices(random_corner(rng, image.shape, patch), patch)
            normal = image[at]
            patches += [normal] + [paste(image, normal, rng) for paste in pastes]
            labels += list(range(1 + len(pastes)))
    return np.stack(patches).astype(np.float32), np.array(labels, np.int64)


def loss(model: CutPasteNet, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Cross-entropy of the model's pretext task (plain vs. its pastes) on patches of the batch ``x`` (B, 1, ...)."""
    patches, labels = training_pairs(x[:, 0].detach().cpu().numpy(), model.patch_shape, rng, model.variant)
    logits = model(torch.from_numpy(patches)[:, None].to(x.device))
    return nn.functional.cross_entropy(logits, torch.from_numpy(labels).to(x.device))


# -- the Gaussian density of normal patches -----------------------------------------------------------------------

def ledoit_wolf(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrunk covariance of (N, D) features (the estimator the paper's GDE uses).

    The covariance is (1 - s) S + s mu I with S the empirical covariance, mu its mean eigenvalue and s the
    Ledoit-Wolf (2004) shrinkage that minimises the expected squared Frobenius error.
    """
    x = np.asarray(features, np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    x = x - mean
    cov = x.T @ x / n
    mu = np.trace(cov) / d
    x2 = x ** 2
    beta = ((x2.T @ x2).sum() / n - (cov ** 2).sum()) / (n * d)
    delta = ((cov - mu * np.eye(d)) ** 2).sum() / d
    shrink = 0.0 if delta == 0 else min(beta, delta) / delta
    return mean, (1 - shrink) * cov + shrink * mu * np.eye(d)


def corners(in_shape: tuple[int, ...], patch: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Dense patch corners: every STRIDE_FRACTION of a patch per axis, the last one flush with the end."""
    starts = []
    for n, p in zip(in_shape, patch):
        step = max(1, int(p * STRIDE_FRACTION))
        starts.append(sorted({*range(0, n - p + 1, step), n - p}))
    return list(itertools.product(*starts))


@torch.no_grad()
def dense_features(model: CutPasteNet, array: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, *spatial) preprocessed image -> (P, width) features of its dense patches (``corners`` order)."""
    image = torch.from_numpy(np.ascontiguousarray(array[0], dtype=np.float32))
    patches = torch.stack([image[box_slices(corner, model.patch_shape)]
                           for corner in corners(image.shape, model.patch_shape)])[:, None]
    return torch.cat([model.embed(patches[i:i + SCORE_BATCH].to(device)).cpu()
                      for i in range(0, len(patches), SCORE_BATCH)])


@torch.no_grad()
def fit_density(model: CutPasteNet, arrays: list[np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The Gaussian of every dense patch of the training arrays: {"gde_mean": (D,), "gde_precision": (D, D)}."""
    model.eval()
    features = torch.cat([dense_features(model, a, device) for a in arrays]).numpy()
    mean, cov = ledoit_wolf(features)
    precision = np.linalg.pinv(cov, hermitian=True)
    return {"gde_mean": torch.from_numpy(mean).float(), "gde_precision": torch.from_numpy(precision).float()}


@torch.no_grad()
def score_map(model: CutPasteNet, array: np.ndarray, density: dict[str, torch.Tensor],
              device: torch.device) -> np.ndarray:
    """(1, *spatial) preprocessed image -> (*spatial) float32: mean Mahalanobis distance of the covering patches,
    smoothed with a Gaussian of a quarter patch per axis."""
    from scipy import ndimage

    model.eval()
    features = dense_features(model, array, device) - density["gde_mean"]
    distance = torch.sqrt(torch.clamp(((features @ density["gde_precision"]) * features).sum(1), min=0)).numpy()
    shape = array.shape[1:]
    total, count = np.zeros(shape), np.zeros(shape)
    for d, corner in zip(distance, corners(shape, model.patch_shape)):
        window = box_slices(corner, model.patch_shape)
        total[window] += d
        count[window] += 1
    smooth = ndimage.gaussian_filter(total / np.maximum(count, 1), sigma=[p / 4 for p in model.patch_shape],
                                     mode="nearest")
    return smooth.astype(np.float32)
