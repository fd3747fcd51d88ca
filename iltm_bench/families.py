"""Validation data that is not ours: cohorts built from real images that packages ship, beside ``iltm synth``.

Two families, each in the folder layout ``iltm synth`` writes (``images/``, ``labels/``, ``manifest.json``), so
``iltm train``, ``iltm detect``, ``iltm evaluate`` and ``iltm benchmark --data-family`` take them:

* ``texture``: real photographs (scikit-image's bundled ``brick``, ``grass``, ``gravel``; 512 x 512, 8-bit). A
  subject is a crop of the normal texture (random position, flip and quarter turn, slight contrast change) with,
  when anomalous, one to three defects: a patch of another texture pasted in (its brightness matched to the
  surroundings, so only its structure differs), a scratch (a thin bright or dark curve), or a blob (a smooth
  stain). The label is where a defect changed the image. Values stay 8-bit (0..255): train with
  ``data.intensity=unit8bit``.
* ``anatomy``: real brain anatomy (nilearn's bundled MNI152 2009 grey- and white-matter maps, 1 mm), made into
  FDG-PET-like axial slices: each subject is a slice deformed by its own random affine and elastic field, with
  grey matter about 8 SUV, white matter about 2.5, CSF and scalp low, blurred like a PET scanner (FWHM about 7 mm),
  with Poisson-like noise, on a 64 x 64 grid of 3 mm pixels. Anomalies are hot spots (SUV 4-9 above the tissue) in
  the brain; the label is where the spot adds at least half its peak. Values are SUV-like: train with a fixed
  ``data.clip_value`` (the sweep uses ``iltm.synth.SUV_CLIP``).

Splits never share source pixels: the texture photographs' rows are cut into bands (``train`` rows 0-255,
``val`` 256-383, ``test`` 384-511) and the template's axial slices into slabs (``train`` z 62-101, ``val``
102-116, ``test`` 117-131, in voxels of the 1 mm template), and every split draws its subjects from its own seed
stream. A cohort is a pure function of (family, split, n, fraction, seed, size)::

    python -m iltm_bench.families --family texture --out DIR --split val --fraction 0.5 --n 48 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from iltm.errors import InputError
from iltm.io import atomic_write_text, image_from_array, write_image
from iltm.synth import prepare_cohort_folder

FAMILIES_VERSION = 1
GENERATOR = "iltm_bench.families"
FAMILIES = ("texture", "anatomy")
SPLITS = ("train", "val", "test")
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # each split its own seed stream
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_ROWS = {"train": (0, 256), "val": (256, 384), "test": (384, 512)}
ANATOMY_SLICES = {"train": (62, 102), "val": (102, 117), "test": (117, 132)}
DEFAULT_SIZE = 64
ANATOMY_SPACING = 3.0  # mm: a PET pixel
DEFECT_KINDS = ("patch", "scratch", "blob")


# -- texture ---------------------------------------------------------------------------------------------------

def texture_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled texture photographs as float (rows, cols) in 0..255."""
    import skimage.data

    if name not in TEXTURES:
        raise InputError("--texture", f"unknown texture '{name}' (choose from {', '.join(TEXTURES)})")
    return getattr(skimage.data, name)().astype(np.float64)


def _crop(source: np.ndarray, rows: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """A random size x size crop inside the row band ``rows``, randomly flipped and turned; also its box."""
    r0 = int(rng.integers(rows[0], rows[1] - size + 1))
    c0 = int(rng.integers(0, source.shape[1] - size + 1))
    crop = source[r0:r0 + size, c0:c0 + size]
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), [r0, c0, size]


def _ellipse(shape, centre, radii, angle) -> np.ndarray:
    """A smooth ellipse (1 inside, soft 1-pixel edge)."""
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    dy, dx = y - centre[0], x - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / radii[1], (-s * dx + c * dy) / radii[0]
    r = np.sqrt(u * u + v * v)
    return np.clip((1.0 - r) * min(radii) + 0.5, 0.0, 1.0)


def _defect(image: np.ndarray, kind: str, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """``image`` with one defect of ``kind``; returns (new image, where it changed (bool), its description)."""
    size = image.shape[0]
    centre = rng.uniform(0.2 * size, 0.8 * size, 2)
    if kind == "patch":
        radii = rng.uniform(0.07, 0.14, 2) * size
        weight = _ellipse(image.shape, centre, radii, rng.uniform(0, np.pi))
        r0, c0 = rng.integers(0, other.shape[0] - size, 2)
        patch = other[r0:r0 + size, c0:c0 + size]
        inside = weight > 0.5
        # Same brightness and contrast as the texture around it: only the structure is foreign.
        patch = (patch - patch[inside].mean()) / (patch[inside].std() + 1e-6) * image.std() + image[inside].mean()
        new = image * (1 - weight) + patch * weight
        desc = {"kind": kind, "centre": centre.tolist(), "radii": radii.tolist()}
    elif kind == "scratch":
        length, angle = rng.uniform(0.25, 0.5) * size, rng.uniform(0, np.pi)
        bend = rng.uniform(-0.15, 0.15) * length
        t = np.linspace(-0.5, 0.5, 200)
        ys = centre[0] + t * length * np.sin(angle) + bend * (1 - 4 * t * t) * np.cos(angle)
        xs = centre[1] + t * length * np.cos(angle) - bend * (1 - 4 * t * t) * np.sin(angle)
        line = np.zeros(image.shape, bool)
        keep = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        line[ys[keep].astype(int), xs[keep].astype(int)] = True
        weight = ndimage.gaussian_filter(ndimage.binary_dilation(line, iterations=1).astype(np.float64), 0.6)
        weight = np.clip(weight / max(weight.max(), 1e-6), 0, 1)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        new = np.clip(image + sign * rng.uniform(60, 100) * weight, 0, 255)
        desc = {"kind": kind, "centre": centre.tolist(), "length": float(length), "sign": sign}
    elif kind == "blob":
        radii = rng.uniform(0.06, 0.12, 2) * size
        weight = ndimage.gaussian_filter(_ellipse(image.shape, centre, radii, rng.uniform(0, np.pi)), 1.0)
        factor = rng.choice([rng.uniform(0.4, 0.6), rng.uniform(1.5, 1.8)])
        new = np.clip(image * (1 + (factor - 1) * weight), 0, 255)
        desc = {"kind": kind, "centre": centre.tolist(), "radii": radii.tolist(), "factor": float(factor)}
    else:
        raise ValueError(kind)
    return new, weight > 0.5, desc


def texture_subject(rng: np.random.Generator, split: str, size: int, anomalous: bool,
                    texture: str = "brick") -> tuple[np.ndarray, np.ndarray, dict]:
    """(image (size, size) float32 0..255, label uint8, description) of one texture subject."""
    source = texture_image(texture)
    image, box = _crop(source, TEXTURE_ROWS[split], size, rng)
    image = np.clip((image - image.mean()) * rng.uniform(0.9, 1.1) + image.mean() + rng.uniform(-8, 8), 0, 255)
    label = np.zeros(image.shape, bool)
    defects = []
    if anomalous:
        others = [t for t in TEXTURES if t != texture]
        for _ in range(int(rng.integers(1, 4))):
            kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
            other = texture_image(others[int(rng.integers(len(others)))])
            # Foreign patches come from the other photographs' rows of this split too.
            other = other[TEXTURE_ROWS[split][0]:TEXTURE_ROWS[split][1]]
            image, where, desc = _defect(image, kind, other, rng)
            label |= where
            defects.append(desc)
    return image.astype(np.float32), label.astype(np.uint8), {"crop": box, "defects": defects}


# -- anatomy ---------------------------------------------------------------------------------------------------

def _template() -> dict[str, np.ndarray]:
    """nilearn's bundled MNI152 2009 maps as float arrays (x, y, z) in [0, 1]: gm, wm, t1."""
    import nibabel
    import nilearn

    folder = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    maps = {}
    for key in ("gm", "wm", "t1"):
        path = folder / f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise InputError(path, "nilearn's bundled MNI152 template is missing (pip install nilearn)")
        maps[key] = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float64) / 255.0
    return maps


_TEMPLATE_CACHE: dict[str, np.ndarray] = {}


def template() -> dict[str, np.ndarray]:
    if not _TEMPLATE_CACHE:
        _TEMPLATE_CACHE.update(_template())
    return _TEMPLATE_CACHE


def _warp(slices: list[np.ndarray], rng: np.random.Generator, out_shape, spacing: float) -> list[np.ndarray]:
    """Sample 1 mm (x, y) slices on an out_shape grid of ``spacing`` mm through one random affine + elastic map."""
    src = slices[0].shape
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1, 2)
    shift = rng.uniform(-6, 6, 2)  # mm
    rows, cols = np.mgrid[:out_shape[0], :out_shape[1]].astype(np.float64)
    u = (rows - (out_shape[0] - 1) / 2) * spacing  # mm around the centre
    v = (cols - (out_shape[1] - 1) / 2) * spacing
    # A smooth random displacement (mm) of a few millimetres: each subject's own anatomy.
    coarse = rng.normal(0, 3.0, (2, 6, 6))
    zoom = (out_shape[0] / 6, out_shape[1] / 6)
    du, dv = (ndimage.zoom(c, zoom, order=3)[:out_shape[0], :out_shape[1]] for c in coarse)
    c, s = np.cos(angle), np.sin(angle)
    a = (c * u - s * v) / scale[0] + shift[0] + du + (src[0] - 1) / 2
    b = (s * u + c * v) / scale[1] + shift[1] + dv + (src[1] - 1) / 2
    return [ndimage.map_coordinates(sl, [a, b], order=1, mode="constant") for sl in slices]


def anatomy_subject(rng: np.random.Generator, split: str, size: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image (size, size) float32 SUV-like, label uint8, description) of one PET-like brain slice."""
    maps = template()
    z = int(rng.integers(*ANATOMY_SLICES[split]))
    # Axial slice (x, y) -> image rows = anterior-posterior (flipped so anterior is up), columns = left-right.
    sl = [np.flipud(maps[k][:, :, z].T) for k in ("gm", "wm", "t1")]
    gm, wm, t1 = _warp(sl, rng, (size, size), ANATOMY_SPACING)
    head = ndimage.binary_fill_holes(t1 > 0.08)
    brain = (gm + wm) > 0.3
    suv_gm, suv_wm = rng.uniform(7.0, 9.5), rng.uniform(2.0, 3.0)
    activity = suv_gm * gm + suv_wm * wm + 0.4 * head * (1 - gm - wm).clip(0, 1)
    label = np.zeros((size, size), bool)
    spots = []
    if anomalous:
        candidates = np.argwhere(ndimage.binary_erosion(brain, iterations=2))
        for _ in range(int(rng.integers(1, 4))):
            if not len(candidates):
                break
            centre = candidates[int(rng.integers(len(candidates)))]
            sigma = rng.uniform(1.0, 2.0)  # pixels: 3-6 mm
            peak = rng.uniform(4.0, 9.0)
            y, x = np.mgrid[:size, :size]
            spot = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma * sigma))
            activity = activity + peak * spot
            label |= spot >= 0.5
            spots.append({"centre": centre.tolist(), "sigma_px": float(sigma), "peak_suv": float(peak)})
    fwhm_mm = rng.uniform(6.0, 8.0)
    blurred = ndimage.gaussian_filter(activity, fwhm_mm / 2.355 / ANATOMY_SPACING)
    noisy = blurred + rng.normal(0.0, 1.0, blurred.shape) * np.sqrt(np.maximum(blurred, 0) * 0.08) + \
        rng.normal(0.0, 0.03, blurred.shape)
    return np.maximum(noisy, 0).astype(np.float32), label.astype(np.uint8), {"slice_z": z, "spots": spots,
                                                                            "fwhm_mm": float(fwhm_mm)}


# -- cohorts ---------------------------------------------------------------------------------------------------

def make_family_cohort(out_dir: str | Path, family: str, n: int, anomalous_fraction: float, seed: int,
                       split: str = "train", size: int = DEFAULT_SIZE, texture: str = "brick",
                       progress: Any = None) -> dict[str, Any]:
    """Write a cohort of ``family`` in ``iltm synth``'s layout and return its manifest.

    Args:
        out_dir: folder to create (or an earlier cohort of this module's to replace).
        family: ``texture`` or ``anatomy``.
        n: subjects; exactly ``round(anomalous_fraction * n)`` of them, chosen at random, get defects.
        seed: with ``split``, the cohort's seed stream; subject i depends only on (seed, split, i).
        split: ``train``, ``val`` or ``test``: which part of the source images it draws from.
        size: the images are size x size pixels.
        texture: the normal photograph of the texture family.
    """
    if family not in FAMILIES:
        raise InputError("--family", f"unknown family '{family}' (choose from {', '.join(FAMILIES)})")
    if split not in SPLITS:
        raise InputError("--split", f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if int(n) < 1:
        raise InputError("--n", f"must be at least 1, not {n}")
    if not 0.0 <= float(anomalous_fraction) <= 1.0:
        raise InputError("--fraction", f"must be between 0 and 1, not {anomalous_fraction}")
    if size % 8 or not 16 <= size <= 128:
        raise InputError("--size", f"{size}: must be a multiple of 8 in [16, 128]")
    out_dir = Path(out_dir)
    prepare_cohort_folder(out_dir, GENERATOR, "family cohort")
    n = int(n)
    stream = [int(seed), SPLIT_STREAM[split], FAMILIES.index(family)]
    n_anomalous = int(round(float(anomalous_fraction) * n))
    anomalous = np.zeros(n, bool)
    anomalous[np.random.default_rng(stream + [0x5EED]).permutation(n)[:n_anomalous]] = True
    spacing = [ANATOMY_SPACING] * 2 if family == "anatomy" else [1.0, 1.0]
    width = max(3, len(str(n - 1)))
    cases = []
    indices = progress.track(range(n), f"{family} cohort") if hasattr(progress, "track") else range(n)
    for i in indices:
        rng = np.random.default_rng(stream + [i + 1])
        if family == "texture":
            image, label, desc = texture_subject(rng, split, size, bool(anomalous[i]), texture)
        else:
            image, label, desc = anatomy_subject(rng, split, size, bool(anomalous[i]))
        case_id = f"{family}_{split}{i:0{width}d}"
        for kind, array in (("images", image), ("labels", label)):
            img = image_from_array(array)
            img.SetSpacing(spacing)
            img.SetOrigin([-(size - 1) / 2 * spacing[0]] * 2)
            write_image(img, out_dir / kind / f"{case_id}.nii.gz")
        cases.append({"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz",
                      "anomalous": bool(anomalous[i]), "n_lesions": len(desc.get("defects", desc.get("spots", []))),
                      "labelled_pixels": int(label.sum()), **desc})
    manifest = {"version": FAMILIES_VERSION, "generator": GENERATOR, "family": family, "split": split,
                "texture": texture if family == "texture" else None, "seed": int(seed), "dims": 2,
                "size": [size, size], "spacing": spacing, "n": n, "anomalous_fraction": float(anomalous_fraction),
                "n_anomalous": n_anomalous, "subjects": cases}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def same_cohort(folder: Path, family: str, n: int, fraction: float, seed: int, split: str, size: int) -> bool:
    """Whether ``folder`` already holds exactly this cohort (the sweep reuses it)."""
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        return (m.get("generator") == GENERATOR and m.get("version") == FAMILIES_VERSION
                and m.get("family") == family and m.get("split") == split and m.get("n") == n
                and m.get("seed") == seed and abs(float(m.get("anomalous_fraction", -1)) - fraction) < 1e-9
                and m.get("size") == [size, size]
                and all((folder / s["image"]).is_file() and (folder / s["label"]).is_file() for s in m["subjects"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


# How each family's images are normalised for the models (the sweep passes these as --set overrides).
FAMILY_SETTINGS = {"texture": ["data.intensity=unit8bit"], "anatomy": []}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iltm_bench.families", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--fraction", type=float, default=0.5, help="share of subjects with defects (default 0.5)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    p.add_argument("--texture", choices=TEXTURES, default="brick", help="normal texture of the texture family")
    args = p.parse_args(argv)
    try:
        m = make_family_cohort(args.out, args.family, args.n, args.fraction, args.seed, args.split, args.size,
                               args.texture)
    except InputError as exc:
        print(f"iltm: error: {exc}")
        return 2
    print(f"wrote {m['n']} {args.family} subjects ({m['n_anomalous']} anomalous) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
