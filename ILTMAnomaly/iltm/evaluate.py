"""Score maps against lesion labels: pairing the files, pooled and per-image metrics, the printed table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import metrics
from .errors import InputError
from .io import IMAGE_SUFFIXES, image_id, read_image
from .layout import SCORE_SUFFIX


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


def load_pairs(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX) -> tuple[list[str], list, list]:
    """(ids, score arrays, boolean label arrays) of every ``<id><suffix>`` in ``scores`` and its label.

    A label is paired by exact id and must lie on its score map's grid (size, spacing, origin and direction within
    :data:`GEOMETRY_TOLERANCE`); anything else is an InputError naming the label.
    """
    if not scores.is_dir():
        raise InputError(scores, "scores folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist")
    paths = sorted((p for p in scores.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")),
                   key=lambda p: p.name)
    if not paths:
        raise InputError(scores, f"no *{suffix} files")
    ids, score_arrays, label_arrays = [], [], []
    for path in paths:
        scan_id = path.name[: -len(suffix)]
        label_path = _find_label(labels, scan_id)
        score_img = read_image(path)
        label_img = read_image(label_path)
        problem = geometry_problem(score_img, label_img)
        if problem:
            raise InputError(label_path, f"label {problem} ({path.name}); resample the label onto the scan's grid")
        ids.append(scan_id)
        score_arrays.append(sitk.GetArrayFromImage(score_img))
        label_arrays.append(sitk.GetArrayFromImage(label_img) > 0.5)
    return ids, score_arrays, label_arrays


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
    """Pooled voxel metrics over the set plus the spread over images (images without lesions skip AUPRO/Dice).

    A metric that is undefined on these labels is None, with the reason under ``"undefined"``, so the summary is
    valid JSON (no NaN) and says why a number is missing.
    """
    result = metrics.evaluate(scores, labels)
    summary: dict[str, Any] = {k: result[k] for k in ("auroc", "aupro", "best_dice", "best_threshold")}
    for key in METRICS:
        values = np.array([p[key] for p in result["per_image"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"{key}_std"] = float(values.std()) if values.size else None
    summary["per_image"] = [{k: _finite_or_none(v) for k, v in p.items()} for p in result["per_image"]]
    reasons = undefined_reasons(labels)
    for key in ("auroc", "aupro", "best_dice", "best_threshold"):
        summary[key] = _finite_or_none(summary[key])
        if summary[key] is None:
            reasons.setdefault(key, "undefined on these labels")
    summary["undefined"] = {k: v for k, v in reasons.items() if summary.get(k) is None}
    return summary


def _finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per method: pooled AUROC, AUPRO and best Dice in % with the spread over images; "n/a" where a
    metric is undefined, with the reason below the table."""
    lines = [f"{'method':<28} {'AUROC':>14} {'AUPRO':>14} {'best Dice':>14}"]
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
        lines.append(f"{name:<28} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("(pooled voxel metrics in %, ± standard deviation over test images)")
    lines.extend(notes)
    return "\n".join(lines)
