"""Score maps against lesion labels: pairing the files, pooled and per-image metrics, the printed table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import metrics
from .errors import InputError
from .io import read_image
from .layout import SCORE_SUFFIX


def _find_label(labels: Path, scan_id: str) -> Path:
    for candidate in sorted(labels.glob(f"{scan_id}.*")):
        return candidate
    raise InputError(labels, f"no label file for '{scan_id}' (expected {scan_id}.nii.gz)")


def load_pairs(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX) -> tuple[list[str], list, list]:
    """(ids, score arrays, boolean label arrays) of every ``<id><suffix>`` in ``scores`` and its label."""
    if not scores.is_dir():
        raise InputError(scores, "scores folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist")
    paths = sorted(scores.glob(f"*{suffix}"))
    if not paths:
        raise InputError(scores, f"no *{suffix} files")
    ids, score_arrays, label_arrays = [], [], []
    for path in paths:
        scan_id = path.name[: -len(suffix)]
        label_path = _find_label(labels, scan_id)
        s = sitk.GetArrayFromImage(read_image(path))
        lab = sitk.GetArrayFromImage(read_image(label_path)) > 0.5
        if s.shape != lab.shape:
            raise InputError(label_path, f"shape {lab.shape} does not match the score map {path.name} {s.shape}")
        ids.append(scan_id)
        score_arrays.append(s)
        label_arrays.append(lab)
    return ids, score_arrays, label_arrays


def summarise(scores: list, labels: list) -> dict[str, Any]:
    """Pooled voxel metrics over the set plus mean/std over images (images without lesions skip AUPRO/Dice)."""
    result = metrics.evaluate(scores, labels)
    summary = {k: result[k] for k in ("auroc", "aupro", "best_dice", "best_threshold")}
    for key in ("auroc", "aupro", "best_dice"):
        values = np.array([p[key] for p in result["per_image"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"{key}_std"] = float(values.std()) if values.size else float("nan")
    summary["per_image"] = result["per_image"]
    return summary


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per method: pooled AUROC, AUPRO and best Dice in % with the spread over images."""
    lines = [f"{'method':<28} {'AUROC':>14} {'AUPRO':>14} {'best Dice':>14}"]
    for name, m in rows.items():
        cells = [f"{100 * m[k]:6.1f} ± {100 * m[k + '_std']:4.1f}" for k in ("auroc", "aupro", "best_dice")]
        lines.append(f"{name:<28} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("(pooled voxel metrics in %, ± standard deviation over test images)")
    return "\n".join(lines)
