"""A synthetic PET-like cohort: whole-body phantoms with physiological uptake and optional hot-spot lesions.

Each subject is a head-to-thigh body (head, neck, trunk, pelvis, upper legs, arms) in SUV-like units: soft tissue
about 1, lungs below it, and organs whose uptake varies between subjects (brain 6-9, heart 2.5-7, liver 1.8-3,
kidneys 3-6, bladder 10-20). Lesions are blurred hot blobs (SUV 3-12, some fainter than the brain), one to four per
anomalous subject, inside the body and clear of the hot organs. The 2D variant is a coronal slice through the same
kind of body. Everything is drawn from ``numpy.random.default_rng`` seeded per subject, so a cohort is a pure
function of its seed.

Shapes are built in "body units" (bu): the body is 2 bu wide with the arms and runs from the upper thighs
(v = -0.6) to above the head (v = 2.1); it is scaled to fill the field of view.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

from .errors import InputError
from .io import atomic_write_text, image_from_array, write_image

SYNTH_VERSION = 1
DEFAULT_SIZE = {2: (64, 64), 3: (40, 32, 56)}  # voxels, x-y(-z); every axis a multiple of 8
DEFAULT_SPACING = {2: 2.0, 3: 4.0}  # mm, isotropic
# Synthetic intensities are SUV-like (bladder up to 20): models trained on these cohorts clip at this fixed SUV, so
# organ brightness stays comparable between scans (a per-scan percentile would rescale each scan by its bladder).
SUV_CLIP = 15.0

# The view: half the body's width (arms included) and the vertical span shown, in body units.
_HALF_WIDTH = 0.9
_V_LOW, _V_HIGH = -0.6, 2.1

# Organs whose uptake a lesion must not touch (they are where physiological hot spots are).
_HOT_ORGANS = ("brain", "heart", "liver", "kidney_l", "kidney_r", "bladder")


@dataclass
class Subject:
    """One synthetic scan in numpy axis order ((y, x) or (z, y, x)) with its ground truth.

    Args:
        image: float32 SUV-like activity.
        label: uint8 0/1 lesion mask.
        body: bool body outline.
        organs: bool mask of the hot organs (brain, heart, liver, kidneys, bladder).
        lesions: one dict per lesion (centre voxel in numpy order, radius in mm, SUV).
    """

    image: np.ndarray
    label: np.ndarray
    body: np.ndarray
    organs: np.ndarray
    lesions: list[dict[str, Any]] = field(default_factory=list)


def _grid(dims: int, size: Sequence[int], spacing: float):
    """Body-unit coordinates (u across, v up, w front-back) of every voxel centre, broadcastable arrays.

    3D arrays are (z, y, x) with z going up; 2D arrays are (row, column) with the head at row 0 (top of a picture).
    Returns (u, v, w, mm_per_bu).
    """
    nx = size[0]
    nv = size[-1] if dims == 3 else size[1]
    half_x = nx * spacing / 2
    half_v = nv * spacing / 2
    mm_per_bu = 0.97 * min(half_x / _HALF_WIDTH, half_v / ((_V_HIGH - _V_LOW) / 2))
    v_mid = (_V_HIGH + _V_LOW) / 2
    x = (np.arange(nx) - (nx - 1) / 2) * spacing / mm_per_bu
    vert = (np.arange(nv) - (nv - 1) / 2) * spacing / mm_per_bu + v_mid
    if dims == 3:
        ny = size[1]
        y = (np.arange(ny) - (ny - 1) / 2) * spacing / mm_per_bu
        # w points to the front (anterior), which is -y in the LPS frame of the written images.
        return x[None, None, :], vert[:, None, None], -y[None, :, None], mm_per_bu
    return x[None, :], vert[::-1, None], None, mm_per_bu


def _ellipsoid(u, v, w, centre, radii, angle=0.0, softness=0.08):
    """Soft ellipsoid (1 inside, 0 outside, logistic edge of relative width ``softness``), optionally rotated by
    ``angle`` radians in the coronal (u, v) plane. In 2D ``w`` is the slice position (a number)."""
    cu, cv, cw = centre
    du, dv = u - cu, v - cv
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    q2 = (du / radii[0]) ** 2 + (dv / radii[1]) ** 2 + ((w - cw) / radii[2]) ** 2
    return expit((1.0 - np.sqrt(q2)) / softness)


def _anatomy(rng: np.random.Generator) -> tuple[dict[str, tuple], dict[str, tuple], dict[str, float]]:
    """Per-subject body parts and organs: name -> (centre, radii, angle) in body units, and organ uptakes."""
    scale = rng.uniform(0.9, 1.04)
    shift = np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.05, 0.05), rng.uniform(-0.02, 0.02)])
    girth = rng.uniform(0.88, 1.12)  # thin to stout

    def part(centre, radii, jitter=0.02, size_var=0.06, angle_var=0.0, wide=1.0):
        c = np.array(centre, float) * scale + shift + rng.uniform(-jitter, jitter, 3)
        r = np.array(radii, float) * scale * rng.uniform(1 - size_var, 1 + size_var, 3)
        r[0] *= wide
        r[2] *= wide
        return c, r, rng.uniform(-angle_var, angle_var)

    leg_gap = rng.uniform(0.17, 0.23)
    arm_u = rng.uniform(0.68, 0.74)
    body = {
        "head": part((0, 1.72, 0), (0.2, 0.26, 0.22)),
        "neck": part((0, 1.42, 0), (0.1, 0.14, 0.1)),
        "trunk": part((0, 0.78, 0), (0.5, 0.74, 0.3), wide=girth),
        "pelvis": part((0, 0.08, 0), (0.45, 0.32, 0.27), wide=girth),
        "leg_l": part((leg_gap, -0.85, 0), (0.17, 0.75, 0.17), wide=girth),
        "leg_r": part((-leg_gap, -0.85, 0), (0.17, 0.75, 0.17), wide=girth),
        "arm_l": part((arm_u, 0.7, 0), (0.09, 0.62, 0.09), angle_var=0.08),
        "arm_r": part((-arm_u, 0.7, 0), (0.09, 0.62, 0.09), angle_var=0.08),
    }
    organs = {
        "lung_l": part((0.24, 1.0, 0), (0.18, 0.3, 0.19), size_var=0.1),
        "lung_r": part((-0.24, 1.0, 0), (0.19, 0.31, 0.19), size_var=0.1),
        "liver": part((-0.2, 0.55, 0), (0.26, 0.16, 0.19), size_var=0.12, angle_var=0.25),
        "kidney_l": part((0.22, 0.34, -0.04), (0.07, 0.12, 0.08), size_var=0.12, angle_var=0.2),
        "kidney_r": part((-0.22, 0.31, -0.04), (0.07, 0.12, 0.08), size_var=0.12, angle_var=0.2),
        "heart": part((0.1, 0.84, 0.04), (0.13, 0.13, 0.12), size_var=0.12, angle_var=0.3),
        "bladder": part((0, 0.02, 0.04), (0.1, 0.08, 0.09), size_var=0.25),
        "brain": part((0, 1.76, 0.01), (0.15, 0.19, 0.17), size_var=0.08),
    }
    uptake = {
        "background": rng.uniform(0.7, 1.3),
        "lung_l": 0.0, "lung_r": 0.0,  # set below, as a fraction of the background
        "liver": rng.uniform(1.8, 3.0),
        "kidney_l": 0.0, "kidney_r": 0.0,
        "heart": rng.uniform(2.5, 7.0),
        "bladder": rng.uniform(10.0, 20.0),
        "brain": rng.uniform(6.0, 9.0),
    }
    lung = uptake["background"] * rng.uniform(0.35, 0.6)
    uptake["lung_l"] = uptake["lung_r"] = lung
    kidney = rng.uniform(3.0, 6.0)
    uptake["kidney_l"] = kidney * rng.uniform(0.9, 1.1)
    uptake["kidney_r"] = kidney * rng.uniform(0.9, 1.1)
    return body, organs, uptake


def _random_rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    if dims == 2:
        a = rng.uniform(0, math.pi)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _lesion_blob(shape, centre, radii_vox, rotation, box_halfwidth) -> tuple[tuple[slice, ...], np.ndarray]:
    """Soft blob in voxel space, an ellipsoid of the given voxel radii, rotated and centred on ``centre`` (voxels);
    computed only in a box around the centre. Returns (box slices, blob values in the box)."""
    box = tuple(slice(max(0, int(math.floor(c - box_halfwidth))), min(n, int(math.ceil(c + box_halfwidth)) + 1))
                for c, n in zip(centre, shape))
    idx = np.meshgrid(*[np.arange(sl.start, sl.stop, dtype=np.float64) for sl in box], indexing="ij")
    d = np.stack([idx[k] - centre[k] for k in range(len(shape))], axis=-1) @ rotation
    q = np.sqrt(np.sum((d / np.asarray(radii_vox)) ** 2, axis=-1))
    return box, expit((1.0 - q) / 0.12)


def _place_lesions(rng, shape, dims, body, organs, n_wanted, spacing) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Hot blobs inside the body, clear of the hot organs and of each other. Returns (activity, label, lesions)."""
    activity = np.zeros(shape, np.float64)
    label = np.zeros(shape, bool)
    lesions: list[dict] = []
    inside = ndimage.distance_transform_edt(body)  # voxels to the outside
    from_organs = ndimage.distance_transform_edt(~organs) if organs.any() else np.full(shape, np.inf)
    for _ in range(n_wanted):
        radius = rng.uniform(1.0, 3.0) if dims == 3 else rng.uniform(1.2, 3.5)  # voxels
        radii_scale = rng.uniform(0.75, 1.3, dims)
        n_parts = int(rng.integers(1, 4))  # irregular outline: up to two satellite blobs
        offsets = [np.zeros(dims)] + [rng.normal(size=dims) for _ in range(n_parts - 1)]
        offsets = [o / (np.linalg.norm(o) + 1e-12) * rng.uniform(0.3, 0.8) if k else o for k, o in enumerate(offsets)]
        sat_radii = [rng.uniform(0.4, 0.7, dims) for _ in range(n_parts - 1)]
        from_lesions = ndimage.distance_transform_edt(~label) if label.any() else np.full(shape, np.inf)
        # Where there is no room for it (a small body, a crowded one), the lesion shrinks until it fits.
        for _attempt in range(8):
            parts = [(offsets[0], radius * radii_scale)] + [(o * radius, radius * r)
                                                            for o, r in zip(offsets[1:], sat_radii)]
            extent = max(np.linalg.norm(off) + r.max() for off, r in parts)
            allowed = (inside > extent + 0.5) & (from_organs > extent + 1.0) & (from_lesions > extent + 2.0)
            candidates = np.flatnonzero(allowed)
            if candidates.size or radius <= 1.0:
                break
            radius = max(1.0, radius * 0.8)
        if candidates.size == 0:  # a very coarse grid: only keep the lesion itself off the organs
            allowed = (inside >= 1.0) & (from_organs > extent + 0.5) & (from_lesions > extent + 2.0)
            candidates = np.flatnonzero(allowed)
        if candidates.size == 0:
            continue
        centre = np.array(np.unravel_index(rng.choice(candidates), shape), float)
        rotation = _random_rotation(rng, dims)
        soft = np.zeros(shape)
        for off, r in parts:
            box, blob = _lesion_blob(shape, centre + off @ rotation.T, r, rotation, extent + 3)
            soft[box] = np.maximum(soft[box], blob)
        soft *= body  # only matters on very coarse grids, where a lesion may reach the skin
        mask = soft > 0.5
        mask[tuple(centre.astype(int))] = True
        suv = rng.uniform(3.0, 12.0)
        activity = np.maximum(activity, suv * soft)
        label |= mask
        lesions.append({"centre_voxel": [int(c) for c in centre], "radius_mm": round(float(radius * spacing), 2),
                        "suv": round(float(suv), 2), "voxels": int(mask.sum())})
    return activity, label, lesions


def make_subject(rng: np.random.Generator, dims: int, size: Sequence[int], spacing: float,
                 anomalous: bool) -> Subject:
    """Draw one phantom (and, when ``anomalous``, its lesions) on a grid of ``size`` voxels (x-y(-z))."""
    u, v, w, _ = _grid(dims, size, spacing)
    shape = tuple(reversed(size))
    if dims == 2:
        w = rng.uniform(-0.03, 0.03)  # the coronal slice position
    body_parts, organ_parts, uptake = _anatomy(rng)
    body_soft = np.zeros(shape)
    for c, r, a in body_parts.values():
        body_soft = np.maximum(body_soft, _ellipsoid(u, v, w, c, r, a, softness=0.05))
    # Soft tissue: the background level with gentle, smooth unevenness.
    unevenness = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(size) / 10, mode="reflect")
    unevenness /= unevenness.std() + 1e-12
    activity = uptake["background"] * body_soft * (1.0 + 0.08 * unevenness)
    organs = np.zeros(shape, bool)
    for name in ("lung_l", "lung_r", "liver", "kidney_l", "kidney_r", "heart", "bladder", "brain"):
        c, r, a = organ_parts[name]
        m = _ellipsoid(u, v, w, c, r, a) * body_soft
        activity = activity * (1 - m) + uptake[name] * m
        if name in _HOT_ORGANS:
            organs |= m > 0.3
    body = body_soft > 0.5
    label = np.zeros(shape, bool)
    lesions: list[dict] = []
    if anomalous:
        n_wanted = int(rng.integers(1, 5))
        lesion_activity, label, lesions = _place_lesions(rng, shape, dims, body, organs, n_wanted, spacing)
        activity = np.maximum(activity, lesion_activity)
        if not lesions:
            raise InputError("--size", f"{'x'.join(map(str, size))} voxels is too small to place a lesion")
    # PET-like: scanner blur (FWHM about two voxels), count noise growing with activity, light post-filtering.
    activity = ndimage.gaussian_filter(activity, sigma=rng.uniform(0.7, 0.95) * (1.0 if dims == 3 else 1.2))
    activity += rng.normal(size=shape) * 0.12 * np.sqrt(np.clip(activity, 0, None) + 0.02)
    activity = np.clip(ndimage.gaussian_filter(activity, sigma=0.5), 0.0, None)
    return Subject(image=activity.astype(np.float32), label=label.astype(np.uint8), body=body, organs=organs,
                   lesions=lesions)


def _spacing_origin(dims: int, size: Sequence[int], spacing: float) -> tuple[list[float], list[float]]:
    return [spacing] * dims, [-(n - 1) / 2 * spacing for n in size]  # centred on the origin


def make_cohort(out_dir: str | Path, dims: int, n: int, anomalous_fraction: float, seed: int,
                size: Sequence[int] | int | None = None, progress: Any = None,
                spacing: float | None = None, dicom: bool = False) -> dict[str, Any]:
    """Write a synthetic cohort and return its manifest.

    Args:
        out_dir: folder to create; gets ``images/<id>.nii.gz`` (float32 SUV-like), ``labels/<id>.nii.gz`` (uint8
            0/1 lesion mask, all zero for healthy subjects, same geometry) and ``manifest.json``.
        dims: 2 (coronal slices) or 3 (volumes).
        n: number of subjects.
        anomalous_fraction: exactly ``round(anomalous_fraction * n)`` subjects get lesions, chosen at random.
        seed: the cohort is a pure function of (seed, dims, n, anomalous_fraction, size, spacing); subject i's
            anatomy depends only on (seed, i).
        size: voxels, x-y(-z) (one number: the same on every axis); default 64x64 (2D) or 40x32x56 (3D).
        progress: an ``iltm.progress.Reporter`` (its ``track`` shows the "synth" stage), or a callable called as
            ``progress(done, total)`` after each subject.
        spacing: isotropic voxel size in mm; default 2 (2D) or 4 (3D).
        dicom: also write each subject as a DICOM PET series in ``dicom/<id>/`` (one file per slice, 2D as one
            slice) whose body-weight SUV is the image: Bq/mL or counts with the tags of a GE, Siemens or Philips
            scanner in turn (:func:`iltm.dicom_pet.synthetic_tags`).

    Returns:
        The manifest: version, seed, dims, size, spacing, n, anomalous_fraction, n_anomalous and ``subjects``, a
        list of {id, image, label, anomalous, n_lesions, lesions} (with ``dicom``: also dicom, the series
        folder, and vendor) with paths relative to ``out_dir``.
    """
    if dims not in (2, 3):
        raise InputError("--dims", f"must be 2 or 3, not {dims}")
    if int(n) < 1:
        raise InputError("--n", f"must be at least 1, not {n}")
    if not 0.0 <= float(anomalous_fraction) <= 1.0:
        raise InputError("--anomalous-fraction", f"must be between 0 and 1, not {anomalous_fraction}")
    size = (size,) if isinstance(size, int) else size
    size = tuple(int(s) for s in (size or DEFAULT_SIZE[dims]))
    if len(size) == 1:
        size = size * dims
    if len(size) != dims:
        raise InputError("--size", f"needs {dims} numbers for a {dims}D cohort, got {len(size)}")
    if min(size) < 16:
        raise InputError("--size", f"{'x'.join(map(str, size))}: every axis needs at least 16 voxels")
    spacing = float(spacing or DEFAULT_SPACING[dims])
    n = int(n)
    out_dir = Path(out_dir)
    prepare_cohort_folder(out_dir)

    n_anomalous = int(round(float(anomalous_fraction) * n))
    choice_rng = np.random.default_rng([int(seed), 0x5EED])
    anomalous = np.zeros(n, bool)
    anomalous[choice_rng.permutation(n)[:n_anomalous]] = True
    width = max(3, len(str(n - 1)))
    spacing_xyz, origin = _spacing_origin(dims, size, spacing)
    cases = []
    indices = progress.track(range(n), "synth") if hasattr(progress, "track") else range(n)
    for i in indices:
        case_id = f"case{i:0{width}d}"
        subject = make_subject(np.random.default_rng([int(seed), i]), dims, size, spacing, bool(anomalous[i]))
        written = {}
        for kind, array in (("images", subject.image), ("labels", subject.label)):
            img = image_from_array(array)
            img.SetSpacing(spacing_xyz)
            img.SetOrigin(origin)
            write_image(img, out_dir / kind / f"{case_id}.nii.gz")
            written[kind] = img
        cases.append({"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz",
                      "anomalous": bool(anomalous[i]), "n_lesions": len(subject.lesions),
                      "lesions": subject.lesions})
        if dicom:
            cases[-1].update(_write_dicom(out_dir, case_id, written["images"], seed, i))
        if callable(progress):
            progress(i + 1, n)
    manifest = {"version": SYNTH_VERSION, "generator": "iltm.synth", "seed": int(seed), "dims": dims,
                "size": list(size), "spacing": spacing_xyz, "n": n, "anomalous_fraction": float(anomalous_fraction),
                "n_anomalous": n_anomalous, "subjects": cases}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _write_dicom(out_dir: Path, case_id: str, suv_image, seed: int, index: int) -> dict[str, str]:
    """Subject ``index`` as a DICOM PET series ``dicom/<id>/`` in a vendor's style; its manifest entries."""
    from .dicom_pet import VENDOR_STYLES, synthetic_tags, write_pet_series

    style = VENDOR_STYLES[index % len(VENDOR_STYLES)]
    rng = np.random.default_rng([int(seed), index, 0xD1C0])
    stored, tags = synthetic_tags(suv_image, style, rng, patient_id=f"SYNTH-{case_id}",
                                  uid_seed=f"iltm.synth/{seed}/{case_id}")
    write_pet_series(out_dir / "dicom" / case_id, stored, tags)
    return {"dicom": f"dicom/{case_id}", "vendor": style}


def prepare_cohort_folder(out_dir: Path, generator: str = "iltm.synth", what: str = "synthetic cohort") -> None:
    """Refuse to mix a new cohort with unrelated files; clear the files of an earlier cohort whose manifest names
    ``generator`` (its images, labels and DICOM series)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    manifest = out_dir / "manifest.json"
    try:
        old = json.loads(manifest.read_text(encoding="utf-8"))
        assert old.get("generator") == generator
    except (OSError, ValueError, AssertionError, AttributeError):
        raise InputError(out_dir, f"exists and is not empty (and is not an earlier {what}); "
                                  "choose a new folder") from None
    for case in old.get("subjects", []):
        for key in ("image", "label"):
            if isinstance(case.get(key), str):
                (out_dir / case[key]).unlink(missing_ok=True)
        series = case.get("dicom")
        if isinstance(series, str) and (out_dir / series).resolve().parent == (out_dir / "dicom").resolve():
            shutil.rmtree(out_dir / series, ignore_errors=True)
    manifest.unlink(missing_ok=True)
