"""Score maps against lesion labels: pairing the files, pooled and per-image metrics, the printed table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import SimpleITK as sitk

from . import metrics
from .errors import InputError
from .io import read_image
from .layout import MASK_SUFFIX, SCORE_SUFFIX
from .lesions import Geometry, scan_score


def _find_label(labels: Path, scan_id: str) -> Path:
    for candidate in sorted(labels.glob(f"{scan_id}.*")):
        return candidate
    raise InputError(labels, f"no label file for '{scan_id}' (expected {scan_id}.nii.gz)")


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

    A folder without any mask map gives ``masks=None`` (the caller says so); one that has some but misses one is
    an InputError naming the missing file.
    """
    if not scores.is_dir():
        raise InputError(scores, "scores folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist")
    paths = sorted(scores.glob(f"*{suffix}"))
    if not paths:
        raise InputError(scores, f"no *{suffix} files")
    ids = [path.name[: -len(suffix)] for path in paths]
    mask_paths = [scores / f"{scan_id}{MASK_SUFFIX}" for scan_id in ids]
    with_masks = with_masks and any(p.is_file() for p in mask_paths)
    cohort = Cohort(ids=ids, scores=[], labels=[], masks=[] if with_masks else None, voxel_ml=[])
    for scan_id, path, mask_path in zip(ids, paths, mask_paths):
        label_path = _find_label(labels, scan_id)
        score_image = read_image(path)
        s = sitk.GetArrayFromImage(score_image)
        lab = sitk.GetArrayFromImage(read_image(label_path)) > 0.5
        if s.shape != lab.shape:
            raise InputError(label_path, f"shape {lab.shape} does not match the score map {path.name} {s.shape}")
        if with_masks:
            if not mask_path.is_file():
                raise InputError(mask_path, "is missing: the lesion-level metrics need the binary map of every scan "
                                            "(iltm detect writes it beside the score map)")
            m = sitk.GetArrayFromImage(read_image(mask_path)) > 0.5
            if m.shape != s.shape:
                raise InputError(mask_path, f"shape {m.shape} does not match the score map {path.name} {s.shape}")
            cohort.masks.append(m)
        cohort.scores.append(s)
        cohort.labels.append(lab)
        cohort.voxel_ml.append(Geometry.of(score_image).voxel_ml)
    return cohort


def load_pairs(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX) -> tuple[list[str], list, list]:
    """(ids, score arrays, boolean label arrays) of every ``<id><suffix>`` in ``scores`` and its label."""
    cohort = load_cohort(scores, labels, suffix, with_masks=False)
    return cohort.ids, cohort.scores, cohort.labels


def summarise(scores: list, labels: list) -> dict[str, Any]:
    """Pooled voxel metrics over the set plus mean/std over images (images without lesions skip AUPRO/Dice), and
    the scan-level AUROC: scans with lesions against scans without, ranked by their scan score (the map's maximum,
    :func:`iltm.lesions.scan_score`); nan unless both kinds are present."""
    result = metrics.evaluate(scores, labels)
    summary = {k: result[k] for k in ("auroc", "aupro", "best_dice", "best_threshold", "average_precision")}
    for key in ("auroc", "aupro", "best_dice"):
        values = np.array([p[key] for p in result["per_image"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"{key}_std"] = float(values.std()) if values.size else float("nan")
    scan_scores = np.array([scan_score(s) for s in scores], dtype=np.float64)
    has_lesion = np.array([bool(np.any(y)) for y in labels])
    summary["scan_auroc"] = metrics.auroc(scan_scores, has_lesion)
    summary["per_image"] = result["per_image"]
    for entry, value, positive in zip(summary["per_image"], scan_scores, has_lesion):
        entry["scan_score"], entry["has_lesion"] = float(value), bool(positive)
    return summary


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
        "lesion_sensitivity": sum(p["detected_lesions"] for p in per_scan) / lesions if lesions else float("nan"),
        "fp_regions_per_scan": float(np.mean([p["fp_regions"] for p in per_scan])),
        "per_scan": per_scan,
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per method: pooled AUROC, AUPRO and best Dice in % with the spread over images; then, for rows
    that have them, AP and scan AUROC (%), and the lesion-level figures."""
    lines = [f"{'method':<28} {'AUROC':>14} {'AUPRO':>14} {'best Dice':>14}"]
    for name, m in rows.items():
        cells = [f"{100 * m[k]:6.1f} ± {100 * m[k + '_std']:4.1f}" for k in ("auroc", "aupro", "best_dice")]
        lines.append(f"{name:<28} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("(pooled voxel metrics in %, ± standard deviation over test images)")
    more = {name: m for name, m in rows.items() if "average_precision" in m}
    if more:
        lines.append("")
        lines.append(f"{'method':<28} {'AP %':>7} {'scan AUROC %':>13} {'FP vol mL':>10} {'FN vol mL':>10} "
                     f"{'lesion sens %':>14} {'FP regions/scan':>16}")
        for name, m in more.items():
            def cell(key, width, scale=1.0, fmt=".1f"):
                value = m.get(key)
                return f"{'-':>{width}}" if value is None else f"{scale * value:>{width}{fmt}}"
            lines.append(f"{name:<28} {cell('average_precision', 7, 100)} {cell('scan_auroc', 13, 100)} "
                         f"{cell('fp_volume_ml', 10, fmt='.2f')} {cell('fn_volume_ml', 10, fmt='.2f')} "
                         f"{cell('lesion_sensitivity', 14, 100)} {cell('fp_regions_per_scan', 16, fmt='.2f')}")
        lines.append("(AP: voxel average precision; scan AUROC: scans ranked by their maximum score; FP/FN volume "
                     "(mean per scan) and lesions on the binary maps, 18-connected as autoPET)")
    return "\n".join(lines)
