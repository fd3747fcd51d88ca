"""Per-lesion PET statistics of a binary map: volume, SUVmax/mean/peak, TLG, centroid, and per-scan totals.

numpy and scipy only at import (no torch, no SimpleITK), so the Slicer module's MRML glue uses the same numbers as
``iltm lesions`` and ``iltm detect --lesions``. Arrays are in numpy axis order ((y, x) or (z, y, x)); geometry is
ITK's (spacing, origin, direction in x, y[, z] order, patient coordinates LPS, mm), as SimpleITK and DICOM use.

A lesion is a connected region of the map with full connectivity (26 neighbours in 3D, 8 in 2D), numbered 1..n
from the largest to the smallest (ties in raster order), as the Slicer panel names its segments.
A 2D image is taken as one slice 1 mm thick, so its "volume" in mL is its area in mm^2 / 1000.
"""

from __future__ import annotations

import csv
import io as _stringio
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

SUV = "SUV"
PEAK_RADIUS_MM = 6.2  # a sphere of this radius holds 1.0 cm^3 (4/3 pi 6.2^3 = 998 mm^3)
SCORE_UNIT = "-ln density"


class Geometry(NamedTuple):
    """ITK image geometry: per-axis spacing (mm), origin (mm, LPS) and direction (row-major d x d), x first."""

    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image) -> "Geometry":
        """The geometry of a SimpleITK image."""
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in mL (a 2D pixel is taken as 1 mm thick)."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """(n, d) continuous voxel indices, x first -> (n, d) patient coordinates in mm."""
        d = len(self.spacing)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(d, d)
        return np.asarray(self.origin) + (np.asarray(index_xyz) * np.asarray(self.spacing)) @ direction.T


@dataclass
class Lesion:
    """One connected region of a binary map. PET values are in the PET's unit (SUV when it is in SUV).

    Attributes:
        id: 1..n, largest region first.
        voxels: voxel count.
        volume_ml: voxels x voxel volume.
        suv_max, suv_mean: highest and mean PET value in the region.
        suv_peak: highest mean PET value in a sphere of radius 6.2 mm (1 cm^3) centred on any voxel of the region,
            counting the image voxels whose centres lie inside the sphere (a disc of that radius in 2D).
        tlg: total lesion glycolysis, suv_mean x volume_ml.
        centroid: mean voxel-centre position in patient coordinates (mm, LPS), x, y[, z].
        score_max: highest anomaly score in the region, when a score map was given.
    """

    id: int
    voxels: int
    volume_ml: float
    suv_max: float
    suv_mean: float
    suv_peak: float
    tlg: float
    centroid: Tuple[float, ...]
    score_max: Optional[float] = None


@dataclass
class ScanTotals:
    """Per-scan totals: lesion count, metabolic tumour volume (mL), total TLG and the scan-level anomaly score."""

    lesion_count: int
    mtv_ml: float
    total_tlg: float
    scan_score: Optional[float] = None


def label_regions(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Connected regions of ``mask`` (full connectivity) numbered 1..n from the largest; returns (labels, n)."""
    mask = np.asarray(mask) > 0
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count == 0:
        return labels.astype(np.int32), 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # stable: equal sizes keep scipy's raster order
    renumber = np.zeros(count + 1, dtype=np.int32)
    renumber[order + 1] = np.arange(1, count + 1, dtype=np.int32)
    return renumber[labels], int(count)


def peak_kernel(spacing: Sequence[float], radius_mm: float = PEAK_RADIUS_MM) -> np.ndarray:
    """Boolean footprint, numpy axis order, of the voxels whose centres lie within ``radius_mm`` of the centre one.

    Args:
        spacing: voxel size in mm, ITK order (x first).
    """
    spacing_np = np.asarray(spacing, dtype=np.float64)[::-1]
    half = np.floor(radius_mm / spacing_np + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_np)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def _peak_in_region(pet: np.ndarray, inside: np.ndarray, box: Tuple[slice, ...], kernel: np.ndarray) -> float:
    """The highest sphere mean centred on a voxel of the region; spheres are cut at the image edge (mean of the
    voxels inside the image)."""
    pad = [k // 2 for k in kernel.shape]
    outer = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, pet.shape))
    values = pet[outer].astype(np.float64)
    weights = kernel.astype(np.float64)
    sums = ndimage.correlate(values, weights, mode="constant", cval=0.0)
    counts = ndimage.correlate(np.ones_like(values), weights, mode="constant", cval=0.0)
    inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
    return float((sums[inner] / counts[inner])[inside].max())


def lesion_statistics(pet: np.ndarray, mask: np.ndarray, geometry: Geometry,
                      score: Optional[np.ndarray] = None) -> List[Lesion]:
    """One :class:`Lesion` per connected region of ``mask``.

    Args:
        pet: (*spatial) PET values (SUV for SUV statistics), numpy axis order.
        mask: (*spatial) binary map (non-zero = lesion) on the same grid.
        geometry: the grid's spacing, origin and direction (:class:`Geometry`).
        score: optional (*spatial) anomaly score map (-log density) on the same grid, for ``score_max``.

    Returns:
        lesions, largest first.
    """
    pet = np.asarray(pet)
    mask = np.asarray(mask)
    if pet.shape != mask.shape:
        raise ValueError(f"PET {pet.shape} and mask {mask.shape} differ in shape")
    if score is not None and np.shape(score) != pet.shape:
        raise ValueError(f"score map {np.shape(score)} and PET {pet.shape} differ in shape")
    if len(geometry.spacing) != pet.ndim:
        raise ValueError(f"geometry is {len(geometry.spacing)}D but the arrays are {pet.ndim}D")
    labels, count = label_regions(mask)
    kernel = peak_kernel(geometry.spacing)
    return [_region(pet, labels[box] == index, box, geometry, kernel, index, score)
            for index, box in enumerate(ndimage.find_objects(labels), start=1)]


def region_statistics(pet: np.ndarray, region: np.ndarray, geometry: Geometry, id: int = 1,
                      score: Optional[np.ndarray] = None) -> Optional[Lesion]:
    """The :class:`Lesion` fields of one given region (all its voxels, connected or not); None when it is empty.

    For a region drawn or edited by hand (a Slicer segment), where :func:`lesion_statistics` would split it.
    """
    region = np.asarray(region) > 0
    boxes = ndimage.find_objects(region.astype(np.int8))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    return _region(np.asarray(pet), region[box], box, geometry, peak_kernel(geometry.spacing), id, score)


def _region(pet, inside, box, geometry: Geometry, kernel, index: int, score) -> Lesion:
    values = pet[box][inside].astype(np.float64)
    voxels = int(inside.sum())
    volume = voxels * geometry.voxel_ml
    centre_zyx = np.argwhere(inside).mean(axis=0) + [b.start for b in box]
    centroid = geometry.index_to_physical(centre_zyx[None, ::-1])[0]
    mean = float(values.mean())
    return Lesion(
        id=index, voxels=voxels, volume_ml=volume, suv_max=float(values.max()), suv_mean=mean,
        suv_peak=_peak_in_region(pet, inside, box, kernel), tlg=mean * volume,
        centroid=tuple(float(c) for c in centroid),
        score_max=None if score is None else float(np.asarray(score)[box][inside].max()))


def scan_score(score: np.ndarray) -> float:
    """The scan-level anomaly score: the highest voxel score of the map.

    The maximum, not a percentile: a scan with one small lesion must rank as anomalous, and a 1 mL lesion in a
    whole-body PET is ~0.01 % of its voxels, below any percentile that ignores noise. Each voxel's score is already
    a density over N reconstructions (DESIGN.md step 3), so a lone noisy voxel is not what the maximum picks up.
    """
    score = np.asarray(score)
    return float(score.max()) if score.size else math.nan


def scan_totals(lesions: Sequence[Lesion], score: Optional[np.ndarray] = None) -> ScanTotals:
    """Totals over a scan's lesions; ``scan_score`` from the whole score map when given."""
    return ScanTotals(lesion_count=len(lesions), mtv_ml=float(sum(x.volume_ml for x in lesions)),
                      total_tlg=float(sum(x.tlg for x in lesions)),
                      scan_score=None if score is None else scan_score(score))


# ------------------------------------------------------------------------------------------------- tables


def value_columns(unit: str = SUV) -> dict:
    """Header of each PET-valued field: ``suv_max [SUV]`` for SUV, else ``pet_max [<unit>]`` (a Bq/mL maximum is
    not an SUV), and ``tlg [<unit>*mL]``."""
    prefix = "suv" if unit == SUV else "pet"
    return {"suv_max": f"{prefix}_max [{unit}]", "suv_mean": f"{prefix}_mean [{unit}]",
            "suv_peak": f"{prefix}_peak [{unit}]", "tlg": f"tlg [{unit}*mL]"}


def lesion_rows(lesions: Sequence[Lesion], unit: str = SUV, with_score: bool = False) -> Tuple[list, list]:
    """(header, rows) of a lesion table; every header but ``id`` and ``voxels`` names its unit in brackets."""
    names = value_columns(unit)
    dims = max((len(x.centroid) for x in lesions), default=3)
    axes = "xyz"[:max(dims, 2)]
    header = (["id", "voxels", "volume_ml [mL]", names["suv_max"], names["suv_mean"], names["suv_peak"],
               names["tlg"]] + [f"centroid_{a}_lps [mm]" for a in axes]
              + ([f"score_max [{SCORE_UNIT}]"] if with_score else []))
    rows = []
    for x in lesions:
        row = [x.id, x.voxels, x.volume_ml, x.suv_max, x.suv_mean, x.suv_peak, x.tlg, *x.centroid]
        if with_score:
            row.append(x.score_max)
        rows.append(row)
    return header, rows


def scan_rows(scans: Sequence[Tuple[str, ScanTotals]], unit: str = SUV) -> Tuple[list, list]:
    """(header, rows) of ``scans.csv``: one row per scan id."""
    header = ["id", "lesion_count", "mtv_ml [mL]", f"total_tlg [{unit}*mL]", f"scan_score [{SCORE_UNIT}] (max)"]
    rows = [[scan_id, t.lesion_count, t.mtv_ml, t.total_tlg, t.scan_score] for scan_id, t in scans]
    return header, rows


def csv_text(header: list, rows: list) -> str:
    """CSV text; floats with 6 significant digits, None as an empty cell."""
    out = _stringio.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return out.getvalue()


def lesions_of_images(pet, mask, score=None, mask_name: str = "mask", score_name: str = "score map"):
    """:func:`lesion_statistics` and :func:`scan_totals` of SimpleITK images on one grid.

    Raises:
        iltm.errors.InputError: naming the mask or score file when its grid differs from the PET's.
    """
    import SimpleITK as sitk

    from .errors import InputError

    for other, name in ((mask, mask_name), (score, score_name)):
        if other is None:
            continue
        same = (other.GetSize() == pet.GetSize() and np.allclose(other.GetSpacing(), pet.GetSpacing(), atol=1e-4)
                and np.allclose(other.GetOrigin(), pet.GetOrigin(), atol=1e-3)
                and np.allclose(other.GetDirection(), pet.GetDirection(), atol=1e-4))
        if not same:
            raise InputError(name, f"grid (size {'x'.join(map(str, other.GetSize()))}, spacing, origin, direction) "
                                   f"differs from the PET's (size {'x'.join(map(str, pet.GetSize()))}); "
                                   "give maps on the PET's grid")
    score_array = None if score is None else sitk.GetArrayViewFromImage(score)
    lesions = lesion_statistics(sitk.GetArrayViewFromImage(pet), sitk.GetArrayViewFromImage(mask) > 0.5,
                                Geometry.of(pet), score_array)
    return lesions, scan_totals(lesions, score_array)
