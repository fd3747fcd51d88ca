"""Score maps against lesion labels: pairing the files, pooled, per-image and lesion-level metrics, the table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import SimpleITK as sitk

from . import metrics
from .errors import InputError
from .io import IMAGE_SUFFIXES, image_id, read_image
from .layout import MASK_SUFFIX, SCORE_SUFFIX
from .lesions import Geometry, scan_score

# Geometry of a label and its score map must agree to this relative tolerance: spacing relative to itself, origin
# relative to the voxel spacing (and its own size), direction cosines absolutely. NIfTI stores float32, so files of
# the same grid written by different tools differ by ~1e-7 relative; a different grid differs by far more.
GEOMETRY_TOLERANCE = 1e-4


def _find_label(labels: Path, scan_id: str) -> Path:
    """The label whose id (file name without image extensions) is exactly ``scan_id``: no pattern matching, so
    ``a[1]`` never pairs with ``a1``."""
    found = [p for p in sorted(labels.iterdir(), key=lambda p: p.name)
             if not p.name.startswith(".") and image_id(p) == scan_id
             and (p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES))]
    if not found:
        raise InputError(labels, f"no label file for '{scan_id}' (expected {scan_id}.nii.gz)")
    if len(found) > 1:
        raise InputError(labels, f"{len(found)} label files for '{scan_id}' ({', '.join(p.name for p in found)}); "
                                 "keep one")
    return found[0]


def geometry_problem(score: sitk.Image, label: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> str | None:
    """How the label's grid differs from the score map's (size, spacing, origin, direction), or None."""
    if score.GetSize() != label.GetSize():
        return f"size {_fmt(label.GetSize())} differs from the score map's {_fmt(score.GetSize())}"
    s_sp, l_sp = np.array(score.GetSpacing()), np.array(label.GetSpacing())
    if not np.all(np.abs(s_sp - l_sp) <= tol * np.maximum(np.abs(s_sp), np.abs(l_sp))):
        return f"spacing {_fmt(label.GetSpacing())} differs from the score map's {_fmt(score.GetSpacing())}"
    s_or, l_or = np.array(score.GetOrigin()), np.array(label.GetOrigin())
    scale = np.maximum.reduce([s_sp, np.abs(s_or), np.abs(l_or), np.ones_like(s_or)])
    if not np.all(np.abs(s_or - l_or) <= tol * scale):
        return f"origin {_fmt(label.GetOrigin())} differs from the score map's {_fmt(score.GetOrigin())}"
    if not np.allclose(score.GetDirection(), label.GetDirection(), rtol=0, atol=tol):
        return f"direction {_fmt(label.GetDirection())} differs from the score map's {_fmt(score.GetDirection())}"
    return None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass
class Cohort:
    """Score maps, binary maps and labels of a results folder, paired by id.

    Attributes:
        masks: the binary maps ``<id>_mask.nii.gz`` beside the scores, or None when the folder has none.
        voxel_ml: one voxel's volume of each scan in mL (a 2D pixel counts as 1 mm thick).
    """

    ids: List[str]
    scores: list
    labels: list
    masks: Optional[list]
    voxel_ml: List[float]


def load_cohort(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX, with_masks: bool = True) -> Cohort:
    """Every ``<id><suffix>`` in ``scores`` with its label and (``with_masks``) its ``<id>_mask.nii.gz``.

    A label is paired by exact id and must lie on its score map's grid (size, spacing, origin and direction within
    :data:`GEOMETRY_TOLERANCE`); anything else is an InputError naming the label. A folder without any mask map
    gives ``masks=None`` (the caller says so); one that has some but misses one is an InputError naming it.
    """
    if not scores.is_dir():
        raise InputError(scores, "scores folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist")
    paths = sorted((p for p in scores.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")),
                   key=lambda p: p.name)
    if not paths:
        raise InputError(scores, f"no *{suffix} files")
    ids = [path.name[: -len(suffix)] for path in paths]
    mask_paths = [scores / f"{scan_id}{MASK_SUFFIX}" for scan_id in ids]
    with_masks = with_masks and any(p.is_file() for p in mask_paths)
    cohort = Cohort(ids=ids, scores=[], labels=[], masks=[] if with_masks else None, voxel_ml=[])
    for scan_id, path, mask_path in zip(ids, paths, mask_paths):
        label_path = _find_label(labels, scan_id)
        score_image = read_image(path)
        label_image = read_image(label_path)
        problem = geometry_problem(score_image, label_image)
        if problem:
            raise InputError(label_path, f"label {problem} ({path.name}); resample the label onto the scan's grid")
        s = sitk.GetArrayFromImage(score_image)
        if with_masks:
            if not mask_path.is_file():
                raise InputError(mask_path, "is missing: the lesion-level metrics need the binary map of every scan "
                                            "(iltm detect writes it beside the score map)")
            m = sitk.GetArrayFromImage(read_image(mask_path)) > 0.5
            if m.shape != s.shape:
                raise InputError(mask_path, f"shape {m.shape} does not match the score map {path.name} {s.shape}")
            cohort.masks.append(m)
        cohort.scores.append(s)
        cohort.labels.append(sitk.GetArrayFromImage(label_image) > 0.5)
        cohort.voxel_ml.append(Geometry.of(score_image).voxel_ml)
    return cohort


def load_pairs(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX) -> tuple[list[str], list, list]:
    """(ids, score arrays, boolean label arrays) of every ``<id><suffix>`` in ``scores`` and its label."""
    cohort = load_cohort(scores, labels, suffix, with_masks=False)
    return cohort.ids, cohort.scores, cohort.labels


METRICS = ("auroc", "aupro", "best_dice")


def undefined_reasons(labels: list) -> dict[str, str]:
    """Why each pooled metric is undefined on these labels (absent when it is defined)."""
    positives = sum(int(np.count_nonzero(lab)) for lab in labels)
    negatives = sum(int(np.size(lab)) for lab in labels) - positives
    reasons = {}
    if positives == 0:
        why = "the labels mark no lesion voxels"
        reasons.update(auroc=why, aupro=why, best_dice=why, best_threshold=why)
    elif negatives == 0:
        why = "the labels mark every voxel as lesion"
        reasons.update(auroc=why, aupro=why)
    return reasons


def summarise(scores: list, labels: list) -> dict[str, Any]:
    """Pooled voxel metrics over the set plus the spread over images (images without lesions skip AUPRO/Dice), the
    voxel average precision, and the scan-level AUROC: scans with lesions against scans without, ranked by their
    scan score (the map's maximum, :func:`iltm.lesions.scan_score`).

    A metric that is undefined on these labels is None, with the reason under ``"undefined"``, so the summary is
    valid JSON (no NaN) and says why a number is missing.
    """
    result = metrics.evaluate(scores, labels)
    summary: dict[str, Any] = {k: result[k] for k in ("auroc", "aupro", "best_dice", "best_threshold",
                                                      "average_precision")}
    for key in METRICS:
        values = np.array([p[key] for p in result["per_image"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"{key}_std"] = float(values.std()) if values.size else None
    scan_scores = np.array([scan_score(s) for s in scores], dtype=np.float64)
    has_lesion = np.array([bool(np.any(y)) for y in labels])
    summary["scan_auroc"] = metrics.auroc(scan_scores, has_lesion)
    summary["per_image"] = [{k: _finite_or_none(v) for k, v in p.items()} for p in result["per_image"]]
    for entry, value, positive in zip(summary["per_image"], scan_scores, has_lesion):
        entry["scan_score"], entry["has_lesion"] = float(value), bool(positive)
    reasons = undefined_reasons(labels)
    if has_lesion.all() or not has_lesion.any():
        reasons["scan_auroc"] = "it needs scans with and scans without lesions"
    for key in ("auroc", "aupro", "best_dice", "best_threshold", "average_precision", "scan_auroc"):
        summary[key] = _finite_or_none(summary[key])
        if summary[key] is None:
            reasons.setdefault(key, "undefined on these labels")
    summary["undefined"] = {k: v for k, v in reasons.items() if summary.get(k) is None}
    return summary


def _finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None


LESION_KEYS = ("fp_volume_ml", "fn_volume_ml", "lesion_sensitivity", "fp_regions_per_scan")


def lesion_summary(masks: list, labels: list, voxel_ml: list) -> dict[str, Any]:
    """autoPET's region-level figures of the binary maps (:func:`iltm.metrics.lesion_detection`, 18-connected):
    false-positive and false-negative volume in mL, mean per scan; lesion sensitivity (true lesions touched by a
    predicted region over all true lesions, pooled); false-positive regions per scan. Also per scan."""
    per_scan = [metrics.lesion_detection(m, y, v) for m, y, v in zip(masks, labels, voxel_ml)]
    lesions = sum(p["lesions"] for p in per_scan)
    return {
        "fp_volume_ml": float(np.mean([p["fp_volume_ml"] for p in per_scan])),
        "fn_volume_ml": float(np.mean([p["fn_volume_ml"] for p in per_scan])),
        "lesion_sensitivity": sum(p["detected_lesions"] for p in per_scan) / lesions if lesions else None,
        "fp_regions_per_scan": float(np.mean([p["fp_regions"] for p in per_scan])),
        "per_scan": per_scan,
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per method: pooled AUROC, AUPRO and best Dice in % with the spread over images ("n/a" where a metric
    is undefined, with the reason below the table); then, for rows that have them, AP and scan AUROC (%), and the
    lesion-level figures."""
    w = max([28, *map(len, rows)])  # the method column fits the longest name
    lines = [f"{'method':<{w}} {'AUROC':>14} {'AUPRO':>14} {'best Dice':>14}"]
    notes = []
    for name, m in rows.items():
        cells = []
        for k in METRICS:
            value, spread = m.get(k), m.get(k + "_std")
            if value is None or not np.isfinite(value):
                cells.append("n/a")
                why = (m.get("undefined") or {}).get(k, "undefined")
                notes.append(f"{k} of {name} is n/a: {why}")
            else:
                std = "n/a" if spread is None or not np.isfinite(spread) else f"{100 * spread:4.1f}"
                cells.append(f"{100 * value:6.1f} ± {std}")
        lines.append(f"{name:<{w}} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("(pooled voxel metrics in %, ± standard deviation over test images)")
    lines.extend(notes)
    more = {name: m for name, m in rows.items() if "average_precision" in m}
    if more:
        lines.append("")
        lines.append(f"{'method':<{w}} {'AP %':>7} {'scan AUROC %':>13} {'FP vol mL':>10} {'FN vol mL':>10} "
                     f"{'lesion sens %':>14} {'FP regions/scan':>16}")
        for name, m in more.items():
            def cell(key, width, scale=1.0, fmt=".1f"):
                value = m.get(key)
                return f"{'n/a':>{width}}" if value is None else f"{scale * value:>{width}{fmt}}"
            lines.append(f"{name:<{w}} {cell('average_precision', 7, 100)} {cell('scan_auroc', 13, 100)} "
                         f"{cell('fp_volume_ml', 10, fmt='.2f')} {cell('fn_volume_ml', 10, fmt='.2f')} "
                         f"{cell('lesion_sensitivity', 14, 100)} {cell('fp_regions_per_scan', 16, fmt='.2f')}")
        lines.append("(AP: voxel average precision; scan AUROC: scans ranked by their maximum score; FP/FN volume "
                     "(mean per scan) and lesions on the binary maps, 18-connected as autoPET; n/a: undefined)")
    return "\n".join(lines)
