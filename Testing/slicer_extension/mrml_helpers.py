"""Helpers shared by the Slicer extension's tests (a uniquely named module: ``conftest`` is ambiguous when
pytest collects ``Testing/`` and ``Testing/slicer_extension/`` together)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ILTMAnomaly"
FAKE_CLI = Path(__file__).resolve().parent / "fake_iltm.py"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def rotated_direction(angle_z: float = 0.5, angle_x: float = 0.3) -> np.ndarray:
    """A proper rotation (det +1) about z then x, as row-major 3x3 direction cosines (LPS)."""
    cz, sz, cx, sx = math.cos(angle_z), math.sin(angle_z), math.cos(angle_x), math.sin(angle_x)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def phantom_pet(shape=(12, 40, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small PET-like array ``(k, j, i)``: an elliptic body of uptake ~1 and two hot lesions (5 and 4).

    Returns:
        (pet float32, lesion labels int: 1 = big lesion, 2 = small lesion).
    """
    k, j, i = shape
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:k, :j, :i]
    body = ((xx - i / 2) / (0.42 * i)) ** 2 + ((yy - j / 2) / (0.38 * j)) ** 2 < 1
    pet = body * (1.0 + 0.05 * rng.standard_normal(shape))
    big = (xx - 0.65 * i) ** 2 + (yy - 0.45 * j) ** 2 + (2.0 * (zz - k / 2)) ** 2 < 30
    small = (xx - 0.3 * i) ** 2 + (yy - 0.55 * j) ** 2 + (2.0 * (zz - k / 2)) ** 2 < 8
    pet = np.where(big, 8.0, np.where(small, 6.5, pet)).astype(np.float32)
    labels = np.where(big, 1, np.where(small, 2, 0))
    return pet, labels


def count_nodes(scene) -> int:
    return scene.GetNumberOfNodes()


def make_run(folder, dims=3, iterations=(0, 1)):
    """The files of a trained run that the panel's checks look at (weights are placeholders)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"preset: tiny\ndata:\n  spatial_dims: {dims}\n")
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "spatial_dims": dims, "images": []}))
    (folder / "vqvae.pt").write_bytes(b"weights")
    for k in iterations:
        (folder / f"iteration_{k:03d}").mkdir(exist_ok=True)
        (folder / f"iteration_{k:03d}" / "transformer.pt").write_bytes(b"weights")
    return folder


def write_cohort(folder, n=2):
    """``n`` rotated, anisotropic PET phantoms as NIfTI files, a training folder for the (fake) CLI."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        pet, _ = phantom_pet(seed=index)
        image = sitk.GetImageFromArray(pet)
        image.SetSpacing((2.0, 2.5, 4.0))
        image.SetDirection(tuple(rotated_direction(0.2 * index, 0.1).reshape(-1)))
        sitk.WriteImage(image, str(folder / f"case{index:03d}.nii.gz"))
    return folder
