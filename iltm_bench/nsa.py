"""Natural Synthetic Anomalies (NSA; Schlueter et al., ECCV 2022), the self-supervised baseline, in 2D and 3D.

A segmentation network learns to find synthetic anomalies: a box cut from another training scan is blended into
a scan with Poisson image editing (the gradients of the source inside the box, the scan's own values on the box's
surface), and the target is a logistic function of how much each voxel changed. At test time its predicted
probability is the anomaly score. Training scans that already hold lesions teach it that lesions are normal, which
is what the contamination sweep measures.

The paper's random rescaling of the source patch is an option (``resize``, off by default so that the committed
sweeps stay what their commands make): the source box is drawn larger or smaller than the box it is blended into,
by one factor for every axis, and resampled to it. So is the paper's mixed-gradient variant (``gradients="mixed"``,
Perez et al.'s mixed seamless cloning): between every two neighbouring voxels of the box the guidance is the
source's or the scan's difference, whichever is larger in magnitude, so the scan's own edges survive the patch.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import fft

# Box sides as a fraction of the scan's side, drawn per axis (NSA draws its widths from a similar range). In 3D each
# drawn fraction u becomes u ** (2 / 3), so that a box fills about as much of a volume as a 2D box of an image
# (NSA is a 2D method): with the 2D sides, 3D boxes held a twelfth of 2D's positive labels and the network learned
# to answer "normal" everywhere.
PATCH_SIDE = (0.1, 0.4)
MAX_PATCHES = 3
NO_PATCH_PROBABILITY = 0.25
# Logistic label: a voxel changed by LABEL_OFFSET (as a fraction of the intensity range) is labelled 0.5, one changed
# by twice that about 0.99. 5 % of the range is also the KDE's bandwidth regulariser: smaller changes are noise.
LABEL_OFFSET, LABEL_SLOPE = 0.05, 100.0
BODY_LEVEL = 0.02  # a box is centred where the scan is above this fraction of its intensity range (inside the body)
# With resizing, the source box's sides are the target box's times one factor drawn from N(1, 0.5) and clipped to
# these bounds: about 45 % of the patches are scaled by less than 30 %, the others by exactly 30 %, up or down.
# The paper rescales its source patches but the distribution here is this project's choice.
RESIZE_BOUNDS = (0.7, 1.3)


GRADIENTS = ("source", "mixed")


def poisson_fill(shell: np.ndarray, laplacian: np.ndarray | None = None) -> np.ndarray:
    """The solution of a discrete Poisson equation inside a box with the given values on its surface.

    Args:
        shell: (*box) array; only its outermost layer is read (every side at least 3).
        laplacian: (*box) array, the Laplacian the solution must have at each inner voxel (only the inner voxels are
            read); ``None`` = 0 everywhere (Laplace's equation: the harmonic fill).

    Returns:
        (*box) array: ``shell`` on the surface, inside the solution of Laplacian(f) = ``laplacian`` (6- or
        4-neighbour Laplacian) with those Dirichlet values, solved exactly with a type-I discrete sine transform.
    """
    inner_shape = tuple(s - 2 for s in shell.shape)
    if min(inner_shape) < 1:
        raise ValueError(f"box {shell.shape} needs at least 3 voxels per side")
    inner = (slice(1, -1),) * shell.ndim
    # The wanted Laplacian minus what the surface contributes to the Laplacian of each inner voxel.
    rhs = np.zeros(inner_shape) if laplacian is None else np.asarray(laplacian, np.float64)[inner].copy()
    for axis in range(shell.ndim):
        for side, at in ((0, 0), (-1, -1)):
            face = list(inner)
            face[axis] = side
            target = [slice(None)] * shell.ndim
            target[axis] = at
            rhs[tuple(target)] -= shell[tuple(face)]
    eigen = sum(np.reshape(2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2,
                           [n if a == axis else 1 for a in range(shell.ndim)])
                for axis, n in enumerate(inner_shape))
    out = shell.astype(np.float64).copy()
    out[inner] = fft.idstn(fft.dstn(rhs, type=1) / eigen, type=1)
    return out


def harmonic_fill(shell: np.ndarray) -> np.ndarray:
    """The discrete harmonic function inside a box with ``shell``'s values on its surface (``poisson_fill``)."""
    return poisson_fill(shell)


def mixed_laplacian(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Divergence of the mixed guidance field: along every axis, between every two neighbouring voxels, the
    difference of ``source`` or of ``target``, whichever is larger in magnitude (ties: the source's).

    Returns:
        (*box) array; its inner voxels are what ``poisson_fill`` reads.
    """
    out = np.zeros(target.shape)
    source, target = source.astype(np.float64), target.astype(np.float64)
    for axis in range(target.ndim):
        d_source, d_target = np.diff(source, axis=axis), np.diff(target, axis=axis)
        guide = np.where(np.abs(d_source) >= np.abs(d_target), d_source, d_target)  # edge between voxel k and k + 1
        # Laplacian along the axis at voxel k: (g[k+1] - g[k]) - (g[k] - g[k-1]) = guide[k] - guide[k-1].
        inner = [slice(None)] * target.ndim
        inner[axis] = slice(1, -1)
        out[tuple(inner)] += np.diff(guide, axis=axis)
    return out


def poisson_blend(target: np.ndarray, source: np.ndarray, gradients: str = "source") -> np.ndarray:
    """Poisson image editing of a box: the guidance gradients inside, ``target``'s values on the surface.

    Args:
        target, source: (*box) arrays of the same shape.
        gradients: ``"source"`` = the source's gradients (seamless cloning); ``"mixed"`` = at every voxel pair the
            larger of the source's and the target's (mixed seamless cloning, NSA's mixed-gradient variant).

    Returns:
        (*box): with source gradients, source + h, h harmonic with h = target - source on the surface.
    """
    if gradients == "source":
        return source + harmonic_fill(target - source)
    if gradients == "mixed":
        return poisson_fill(target, mixed_laplacian(target, source))
    raise ValueError(f"gradients must be one of {', '.join(GRADIENTS)}, not '{gradients}'")


def box_sides(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Random box sides for a scan of ``shape``: PATCH_SIDE per axis, raised to 2 / ndim (at least 3 voxels)."""
    return tuple(int(max(3, round(rng.uniform(*PATCH_SIDE) ** (2 / len(shape)) * n))) for n in shape)


def box_slices(corner, box) -> tuple[slice, ...]:
    """The index of a box of sides ``box`` whose first voxel is ``corner``."""
    return tuple(slice(c, c + n) for c, n in zip(corner, box))


def random_corner(rng: np.random.Generator, shape, box, inside: np.ndarray | None = None) -> tuple[int, ...]:
    """A random corner for ``box``; with ``inside``, one whose box centre lies in it when any of 10 draws does."""
    corner = tuple(int(rng.integers(0, n - b + 1)) for n, b in zip(shape, box))
    for _ in range(10 if inside is not None else 0):
        if inside[tuple(c + b // 2 for c, b in zip(corner, box))]:
            break
        corner = tuple(int(rng.integers(0, n - b + 1)) for n, b in zip(shape, box))
    return corner


def resized_source(source: np.ndarray, box: tuple[int, ...], rng: np.random.Generator,
                   bounds: tuple[float, float] = RESIZE_BOUNDS) -> np.ndarray:
    """A box of ``source`` whose sides are ``box``'s times one random factor, resampled (linearly) to ``box``.

    Args:
        source: (*spatial) scan the patch is cut from.
        box: sides of the box it will be blended into.
        bounds: the factor is drawn from N(1, 0.5) and clipped to these.

    Returns:
        (*box) float64 array.
    """
    scale = float(np.clip(rng.normal(1.0, 0.5), *bounds))
    side = tuple(int(min(n, max(3, round(b * scale)))) for b, n in zip(box, source.shape))
    cut = source[box_slices(random_corner(rng, source.shape, side), side)]
    if side == tuple(box):
        return cut.astype(np.float64)
    mode = "bilinear" if len(box) == 2 else "trilinear"
    tensor = torch.from_numpy(np.ascontiguousarray(cut, dtype=np.float64))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(box), mode=mode, align_corners=False)[0, 0].numpy()


def synthesize(images: np.ndarray, rng: np.random.Generator, intensity_range: float = 1.0,
               resize: bool = False, gradients: str = "source") -> tuple[np.ndarray, np.ndarray]:
    """Blend up to MAX_PATCHES boxes from other images of the batch into each image.

    Args:
        images: (B, *spatial) float array; image b takes its patches from image b + 1 (itself when B = 1).
        intensity_range: 1 for intensities in [0, 1], 255 for 0..255.
        resize: cut each source box at a random scale (RESIZE_BOUNDS) and resample it to the target box.
        gradients: the blend's guidance, ``"source"`` or ``"mixed"`` (``poisson_blend``).

    Returns:
        (changed images (B, *spatial), labels (B, *spatial) in [0, 1]).
    """
    out = images.astype(np.float64).copy()
    labels = np.zeros_like(out)
    shape = images.shape[1:]
    if any(n < 3 for n in shape):
        raise ValueError(f"images {shape} are too small for 3-voxel patches")
    for b in range(images.shape[0]):
        if rng.random() < NO_PATCH_PROBABILITY:
            continue
        source = images[(b + 1) % images.shape[0]]
        inside = images[b] > BODY_LEVEL * intensity_range
        for _ in range(int(rng.integers(1, MAX_PATCHES + 1))):
            box = box_sides(rng, shape)
            if resize:
                patch = resized_source(source, box, rng)
            else:
                patch = source[box_slices(random_corner(rng, shape, box), box)].astype(np.float64)
            dst = box_slices(random_corner(rng, shape, box, inside), box)
            before = out[b][dst].copy()
            out[b][dst] = poisson_blend(before, patch, gradients)
            change = np.abs(out[b][dst] - before) / intensity_range
            label = 1.0 / (1.0 + np.exp(-LABEL_SLOPE * (change - LABEL_OFFSET)))
            labels[b][dst] = np.maximum(labels[b][dst], label)
    return out.astype(np.float32), labels.astype(np.float32)


def loss(model: torch.nn.Module, x: torch.Tensor, rng: np.random.Generator, intensity_range: float = 1.0,
         resize: bool = False, gradients: str = "source") -> torch.Tensor:
    """Binary cross-entropy of the network's voxel logits against the synthetic labels of batch ``x`` (B, 1, ...)
    (``resize``, ``gradients``: see ``synthesize``)."""
    changed, labels = synthesize(x[:, 0].detach().cpu().numpy(), rng, intensity_range, resize, gradients)
    changed_t = torch.from_numpy(changed)[:, None].to(x.device)
    labels_t = torch.from_numpy(labels)[:, None].to(x.device)
    return torch.nn.functional.binary_cross_entropy_with_logits(model(changed_t), labels_t)


def build(spatial_dims: int, channels: list[int]) -> torch.nn.Module:
    """MONAI U-Net, one input and one output (logit) channel, ``len(channels) - 1`` stride-2 levels."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims, 1, 1, channels=list(channels), strides=[2] * (len(channels) - 1), num_res_units=1,
                norm="batch")
