"""Voxel-level evaluation metrics: AUROC, AUPRO and the best achievable Dice (DESIGN.md, step 5).

Every metric takes one score array or a list of them, with matching label arrays (2D or 3D, shapes may differ
between images), and pools all voxels of the set. A voxel is predicted anomalous at threshold t when
``score >= t``; a label is anomalous when it is non-zero. Each metric sorts the pooled scores once and reads
every threshold off cumulative sums at the ends of runs of tied scores, so ties are never split and ~1e7 voxels
take seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["auroc", "aupro", "best_dice", "average_precision", "lesion_detection", "evaluate"]


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, possibly on a GPU
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _pairs(scores, labels) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(scores, (list, tuple)) != isinstance(labels, (list, tuple)):
        raise ValueError("scores and labels must both be single arrays or both be lists")
    if not isinstance(scores, (list, tuple)):
        scores, labels = [scores], [labels]
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} score arrays but {len(labels)} label arrays")
    pairs = []
    for i, (score, label) in enumerate(zip(scores, labels)):
        score, label = _to_numpy(score), _to_numpy(label)
        if score.shape != label.shape:
            raise ValueError(f"image {i}: scores {score.shape} and labels {label.shape} differ in shape")
        if np.isnan(score).any():
            raise ValueError(f"image {i}: scores contain NaN")
        pairs.append((score, label != 0))
    return pairs


def _region_weights(label: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-voxel 1 / (size of its connected region), 0 on normal voxels, and the number of regions."""
    full_connectivity = np.ones((3,) * label.ndim, dtype=bool)
    regions, num_regions = ndimage.label(label, structure=full_connectivity)
    sizes = np.bincount(regions.ravel()).astype(np.float64)
    sizes[0] = np.inf  # background gets weight 1/inf = 0
    return (1.0 / sizes)[regions].ravel(), num_regions


@dataclass
class _Curve:
    """Cumulative counts at every distinct threshold, highest threshold first.

    Entry k describes the prediction ``score >= thresholds[k]``.
    """

    thresholds: np.ndarray  # distinct scores, descending
    true_positives: np.ndarray  # anomalous voxels at or above the threshold (int64)
    false_positives: np.ndarray  # normal voxels at or above the threshold (int64)
    positives: int
    negatives: int
    pro: np.ndarray | None = None  # mean per-region overlap
    num_regions: int = 0


def _curve(pairs, with_regions: bool) -> _Curve:
    scores = np.concatenate([s.ravel().astype(np.float64) for s, _ in pairs])
    labels = np.concatenate([y.ravel() for _, y in pairs])
    order = np.argsort(scores, kind="stable")[::-1]
    ranked = scores[order]
    # != rather than np.diff: inf - inf is nan and would split a run of tied infinite scores.
    run_ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1) if ranked.size else ranked[:0]
    run_ends = run_ends.astype(np.int64)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[run_ends]
    curve = _Curve(
        thresholds=ranked[run_ends],
        true_positives=true_positives,
        false_positives=run_ends + 1 - true_positives,
        positives=int(labels.sum()),
        negatives=int(labels.size - labels.sum()),
    )
    if with_regions:
        weights, counts = zip(*(_region_weights(y) for _, y in pairs))
        curve.num_regions = int(sum(counts))
        if curve.num_regions:
            # Each region contributes 1 / (size * R) per voxel above threshold, so the cumulative sum is the
            # mean over regions of the overlap fraction, whichever image each region lies in.
            overlap = np.cumsum(np.concatenate(weights)[order])[run_ends] / curve.num_regions
            curve.pro = np.clip(overlap, 0.0, 1.0)  # float rounding may overshoot 1 by ~1e-16
    return curve


def _auroc(curve: _Curve) -> float:
    if curve.positives == 0 or curve.negatives == 0:
        return math.nan
    # Mann-Whitney U with ties counted as half a win, kept in integers (doubled) so it is exact.
    positives_in_run = np.diff(curve.true_positives, prepend=0)
    negatives_in_run = np.diff(curve.false_positives, prepend=0)
    negatives_below = curve.negatives - curve.false_positives
    twice_u = 2 * int(np.dot(positives_in_run, negatives_below)) + int(np.dot(positives_in_run, negatives_in_run))
    return twice_u / (2.0 * curve.positives * curve.negatives)


def _aupro(curve: _Curve, fpr_limit: float) -> float:
    if curve.pro is None or curve.negatives == 0:
        return math.nan
    fpr = np.concatenate([[0.0], curve.false_positives / curve.negatives])
    pro = np.concatenate([[0.0], curve.pro])
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit (fpr is sorted)
    fpr_part, pro_part = fpr[:inside], pro[:inside]
    if inside < fpr.size and fpr_part[-1] < fpr_limit:
        # The curve is linear between the last point inside and the first outside; close it at the limit.
        f0, f1, p0, p1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        fpr_part = np.append(fpr_part, fpr_limit)
        pro_part = np.append(pro_part, p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0))
    area = float(np.sum(np.diff(fpr_part) * (pro_part[1:] + pro_part[:-1]) / 2.0))
    return area / fpr_limit


def _best_dice(curve: _Curve) -> tuple[float, float]:
    if curve.positives == 0:
        return math.nan, math.nan
    predicted = curve.true_positives + curve.false_positives
    dice = 2.0 * curve.true_positives / (predicted + curve.positives)
    best = int(np.argmax(dice))  # first maximum = highest threshold reaching it
    return float(dice[best]), float(curve.thresholds[best])


def _average_precision(curve: _Curve) -> float:
    if curve.positives == 0:
        return math.nan
    # Step-wise area under the precision-recall curve, sum_k (R_k - R_k-1) P_k, one point per distinct threshold
    # (scikit-learn's average_precision_score).
    recall = curve.true_positives / curve.positives
    precision = curve.true_positives / (curve.true_positives + curve.false_positives)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auroc(scores, labels) -> float:
    """Voxel-level area under the ROC curve over the pooled set, exact and tie-aware.

    Computed as the Mann-Whitney statistic: the probability that a random anomalous voxel scores higher than a
    random normal one, ties counting one half (equal to the trapezoidal ROC area).

    Args:
        scores: array (2D or 3D, higher = more anomalous) or a list of them; numpy or torch.
        labels: matching array(s) of the same shapes, non-zero = anomalous.

    Returns:
        AUROC in [0, 1]; nan when the set has no anomalous or no normal voxels.
    """
    return _auroc(_curve(_pairs(scores, labels), with_regions=False))


def aupro(scores, labels, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to a false positive rate, normalised so a perfect detector gets 1.

    Regions are the connected components of each label array with full connectivity (8-neighbourhood in 2D,
    26-neighbourhood in 3D: voxels touching only at a corner belong to the same region). At each threshold,
    PRO is the mean over all regions of all images of the fraction of the region's voxels at or above the
    threshold, and FPR is the fraction of all normal voxels at or above it. PRO is integrated over FPR in
    [0, fpr_limit] with the trapezoid rule (the point at exactly ``fpr_limit`` interpolated linearly) and divided
    by ``fpr_limit``.

    Args:
        scores: array (2D or 3D, higher = more anomalous) or a list of them; numpy or torch.
        labels: matching array(s) of the same shapes, non-zero = anomalous.
        fpr_limit: upper end of the integration, a false positive rate in (0, 1].

    Returns:
        AUPRO in [0, 1]; nan when there are no anomalous regions or no normal voxels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return _aupro(_curve(_pairs(scores, labels), with_regions=True), fpr_limit)


def best_dice(scores, labels) -> tuple[float, float]:
    """Best Dice over one global threshold for the whole set (predicted anomalous where ``score >= threshold``).

    Every distinct score is tried as the threshold; tied voxels are always on the same side.

    Args:
        scores: array (2D or 3D, higher = more anomalous) or a list of them; numpy or torch.
        labels: matching array(s) of the same shapes, non-zero = anomalous.

    Returns:
        (dice, threshold): the best Dice in [0, 1] and the highest threshold reaching it, in score units;
        (nan, nan) when the set has no anomalous voxels.
    """
    return _best_dice(_curve(_pairs(scores, labels), with_regions=False))


def average_precision(scores, labels) -> float:
    """Voxel-level average precision over the pooled set: sum over distinct thresholds of the recall gained times
    the precision there (no interpolation), as scikit-learn's ``average_precision_score``; ties never split.

    Args:
        scores: array (2D or 3D, higher = more anomalous) or a list of them; numpy or torch.
        labels: matching array(s) of the same shapes, non-zero = anomalous.

    Returns:
        AP in [0, 1]; nan when the set has no anomalous voxels.
    """
    return _average_precision(_curve(_pairs(scores, labels), with_regions=False))


# autoPET's evaluation (lab-midas/autoPET val_script.py) labels regions with cc3d connectivity 18 in 3D: faces and
# edges, not corners. generate_binary_structure(ndim, 2) is that in 3D and the 8-neighbourhood in 2D.
def _lesion_structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, 2)


def lesion_detection(prediction, label, voxel_ml: float = 1.0) -> dict:
    """Region-level comparison of one binary prediction with one label map, as autoPET counts it.

    Regions are 18-connected in 3D (8 in 2D). A predicted region is a false positive when it shares no voxel with
    the label; a true lesion is missed (false negative) when it shares no voxel with the prediction.

    Args:
        prediction: binary map (non-zero = predicted anomalous), 2D or 3D.
        label: ground truth of the same shape, non-zero = lesion.
        voxel_ml: one voxel's volume in mL.

    Returns:
        ``{"lesions", "detected_lesions", "predicted_regions", "fp_regions", "fp_volume_ml", "fn_volume_ml"}``.
    """
    prediction, label = _to_numpy(prediction) != 0, _to_numpy(label) != 0
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in shape")
    structure = _lesion_structure(label.ndim)
    true_regions, n_true = ndimage.label(label, structure=structure)
    pred_regions, n_pred = ndimage.label(prediction, structure=structure)
    true_sizes = np.bincount(true_regions.ravel(), minlength=n_true + 1)
    pred_sizes = np.bincount(pred_regions.ravel(), minlength=n_pred + 1)
    hit_true = np.zeros(n_true + 1, dtype=bool)
    hit_true[np.unique(true_regions[prediction])] = True
    hit_pred = np.zeros(n_pred + 1, dtype=bool)
    hit_pred[np.unique(pred_regions[label])] = True
    missed, false_pos = ~hit_true[1:], ~hit_pred[1:]
    return {"lesions": int(n_true), "detected_lesions": int(n_true - missed.sum()), "predicted_regions": int(n_pred),
            "fp_regions": int(false_pos.sum()),
            "fp_volume_ml": float(pred_sizes[1:][false_pos].sum() * voxel_ml),
            "fn_volume_ml": float(true_sizes[1:][missed].sum() * voxel_ml)}


def evaluate(scores, labels, fpr_limit: float = 0.3) -> dict:
    """All metrics over the pooled set, and per image so callers can report mean and standard deviation.

    Args:
        scores: array (2D or 3D, higher = more anomalous) or a list of them; numpy or torch.
        labels: matching array(s) of the same shapes, non-zero = anomalous.
        fpr_limit: AUPRO integration limit, see :func:`aupro`.

    Returns:
        ``{"auroc", "aupro", "best_dice", "best_threshold", "average_precision"}`` pooled over the set, plus
        ``"per_image"``: one dict per image with the same keys (nan where undefined, e.g. AUROC and Dice on an
        image without anomalies).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")

    def summary(pairs) -> dict:
        curve = _curve(pairs, with_regions=True)
        dice, threshold = _best_dice(curve)
        return {"auroc": _auroc(curve), "aupro": _aupro(curve, fpr_limit), "best_dice": dice, "best_threshold": threshold,
                "average_precision": _average_precision(curve)}

    pairs = _pairs(scores, labels)
    result = summary(pairs)
    result["per_image"] = [summary([pair]) for pair in pairs]
    return result
