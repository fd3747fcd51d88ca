"""Voxel metrics (iltm.metrics) against hand-computed values, a brute-force AUPRO and sklearn's AUROC."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from iltm import metrics

torch.set_num_threads(1)


# --- AUROC -------------------------------------------------------------------------------------------------


def test_auroc_with_ties_by_hand():
    # Anomalous {2, 3} vs normal {1, 2}: 2>1 (1), 2=2 (1/2), 3>1 (1), 3>2 (1) -> 3.5 / 4.
    scores = np.array([[1.0, 2.0], [2.0, 3.0]])
    labels = np.array([[0, 1], [0, 1]])
    assert metrics.auroc(scores, labels) == pytest.approx(0.875, abs=1e-15)


def test_auroc_perfect_inverted_and_constant():
    labels = np.array([[0, 0, 1], [0, 1, 1]])
    scores = labels + np.array([[0.1, 0.3, 0.2], [0.0, 0.4, 0.1]])
    assert metrics.auroc(scores, labels) == 1.0
    assert metrics.auroc(-scores, labels) == 0.0
    assert metrics.auroc(np.ones((2, 3)), labels) == 0.5  # every pair tied


def test_auroc_undefined_without_both_classes():
    assert math.isnan(metrics.auroc(np.random.rand(3, 3), np.zeros((3, 3))))
    assert math.isnan(metrics.auroc(np.random.rand(3, 3), np.ones((3, 3))))


def test_auroc_matches_sklearn_on_list_of_shapes():
    rng = np.random.default_rng(0)
    shapes = [(17, 23), (5, 6, 7), (40, 3)]
    labels = [rng.random(s) < 0.2 for s in shapes]
    # Rounded scores create many ties; labels shift the scores so the AUROC is far from 0.5.
    scores = [np.round(rng.random(s) + 0.4 * y, 1) for s, y in zip(shapes, labels)]
    expected = roc_auc_score(np.concatenate([y.ravel() for y in labels]), np.concatenate([s.ravel() for s in scores]))
    assert metrics.auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert 0.6 < expected < 0.95
    # torch tensors are accepted too.
    got = metrics.auroc([torch.from_numpy(s) for s in scores], [torch.from_numpy(y) for y in labels])
    assert got == pytest.approx(expected, abs=1e-12)


# --- AUPRO -------------------------------------------------------------------------------------------------

# One row: region A = {0} (1 voxel), region B = {2, 3, 4} (3 voxels), normal voxels {1, 5, 6, 7, 8} (5 voxels).
HAND_LABELS = np.array([[1, 0, 1, 1, 1, 0, 0, 0, 0]])
HAND_SCORES = np.array([[0.9, 0.7, 0.8, 0.5, 0.2, 0.4, 0.3, 0.1, 0.0]])
# Thresholds from the top, (FPR, PRO) with PRO = (overlap_A + overlap_B) / 2:
#   start (0, 0); 0.9: (0, 1/2); 0.8: (0, 2/3); 0.7: (1/5, 2/3); 0.5: (1/5, 5/6); 0.4: (2/5, 5/6);
#   0.3: (3/5, 5/6); 0.2: (3/5, 1); ...
# Up to FPR 0.3: 0.2 * 2/3 + 0.1 * 5/6 = 13/60, normalised by 0.3 -> 13/18.
# (Weighting voxels instead of regions would give PRO 1/4, 1/2, ... and a different value.)
HAND_AUPRO = 13 / 18


def test_aupro_two_regions_of_different_sizes_by_hand():
    assert metrics.aupro(HAND_SCORES, HAND_LABELS, fpr_limit=0.3) == pytest.approx(HAND_AUPRO, abs=1e-12)


def test_aupro_interpolates_at_the_limit_on_a_sloped_segment():
    # Move B's lowest voxel from 0.2 to 0.3, tied with a normal voxel: the curve goes from (2/5, 5/6) to
    # (3/5, 1) in one straight step. At FPR 0.5 the interpolated PRO is 5/6 + 1/6 * 1/2 = 11/12.
    # Area to 0.5: 0.2 * 2/3 + 0.2 * 5/6 + 0.1 * (5/6 + 11/12) / 2 = 93/240, normalised by 0.5 -> 31/40.
    scores = HAND_SCORES.copy()
    scores[0, 4] = 0.3
    assert metrics.aupro(scores, HAND_LABELS, fpr_limit=0.5) == pytest.approx(31 / 40, abs=1e-12)


def test_aupro_pools_regions_over_a_list_of_differently_shaped_images():
    # The hand case split in two: region A with two normals in a 2x2, region B with three normals in a 2x3.
    labels = [np.array([[1, 0], [0, 0]]), np.array([[1, 1, 1], [0, 0, 0]])]
    scores = [np.array([[0.9, 0.7], [0.0, -1.0]]), np.array([[0.8, 0.5, 0.2], [0.4, 0.3, 0.1]])]
    # Normals are now 0.7, 0.0, -1.0, 0.4, 0.3, 0.1 (6 of them); redo the curve:
    #   (0, 1/2), (0, 2/3), (1/6, 2/3), (1/6, 5/6), (2/6, 5/6), (3/6, 5/6), ...
    # Up to 0.3: 1/6 * 2/3 + (0.3 - 1/6) * 5/6 = 1/9 + 1/9 = 2/9, normalised -> 20/27.
    assert metrics.aupro(scores, labels, fpr_limit=0.3) == pytest.approx(20 / 27, abs=1e-12)


def test_aupro_perfect_inverted_and_no_regions():
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1:3, 1:3] = 1
    labels[4, 4] = 1
    scores = labels + 0.5 * np.random.default_rng(1).random(labels.shape)
    assert metrics.aupro(scores, labels) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(-scores, labels) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.aupro(scores, np.zeros_like(labels)))


def test_aupro_3d_diagonal_neighbours_are_one_region():
    # a = (0,0,0) touches b1 = (1,1,1) only at a corner; b2 = (1,1,2) shares a face with b1.
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[1, 1, 2] = 1
    scores = np.full(labels.shape, 0.5)
    scores[0, 0, 0], scores[1, 1, 1], scores[1, 1, 2] = 1.0, 0.0, 0.0
    # Full (26-) connectivity: one region of 3 voxels; only a is above the tied normals, so PRO = 1/3 flat
    # until FPR 1 -> AUPRO 1/3. Face (6-) or edge (18-) connectivity would give regions {a}, {b1, b2}
    # and PRO = (1 + 0) / 2 = 1/2.
    assert metrics.aupro(scores, labels) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_2d_diagonal_neighbours_are_one_region():
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[0, 0] = labels[1, 1] = labels[1, 2] = 1
    scores = np.full(labels.shape, 0.5)
    scores[0, 0], scores[1, 1], scores[1, 2] = 1.0, 0.0, 0.0
    assert metrics.aupro(scores, labels) == pytest.approx(1 / 3, abs=1e-12)  # 8-connectivity, as above


def _brute_force_aupro(scores, labels, fpr_limit):
    """One full pass over the voxels per threshold: slow, obviously right."""
    regions = []
    for y in labels:
        lab, n = ndimage.label(y, structure=np.ones((3,) * y.ndim))
        regions += [(len(regions), lab == r) for r in range(1, n + 1)]
    all_scores = np.concatenate([s.ravel() for s in scores])
    normal_scores = np.concatenate([s[y == 0] for s, y in zip(scores, labels)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fprs.append(np.mean(normal_scores >= t))
        overlaps = []
        for s, y in zip(scores, labels):
            lab, n = ndimage.label(y, structure=np.ones((3,) * y.ndim))
            overlaps += [np.mean(s[lab == r] >= t) for r in range(1, n + 1)]
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    # Keep the last point at each FPR <= limit and the first beyond it, then cut the segment at the limit.
    keep = fprs <= fpr_limit
    first_out = np.argmax(~keep) if (~keep).any() else None
    x, y = list(fprs[keep]), list(pros[keep])
    if first_out is not None and x[-1] < fpr_limit:
        x0, y0, x1, y1 = x[-1], y[-1], fprs[first_out], pros[first_out]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return np.trapezoid(y, x) / fpr_limit


def test_aupro_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(3)
    labels, scores = [], []
    for shape in [(20, 24), (8, 9, 10)]:
        blobs = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.53
        labels.append(blobs.astype(np.uint8))
        scores.append(np.round(blobs * 0.3 + rng.random(shape), 2))
    num_regions = sum(ndimage.label(y, structure=np.ones((3,) * y.ndim))[1] for y in labels)
    assert num_regions >= 4
    for limit in (0.05, 0.3, 1.0):
        expected = _brute_force_aupro(scores, labels, limit)
        assert metrics.aupro(scores, labels, fpr_limit=limit) == pytest.approx(expected, abs=1e-10)


# --- best Dice ---------------------------------------------------------------------------------------------


def test_best_dice_by_hand():
    scores = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    labels = np.array([[1, 0, 1], [1, 0, 0]])
    # Dice = 2 TP / (predicted + 3) at t = 0.9..0.4: 2/4, 2/5, 4/6, 6/7, 6/8, 6/9 -> best 6/7 at 0.6.
    dice, threshold = metrics.best_dice(scores, labels)
    assert dice == pytest.approx(6 / 7, abs=1e-15)
    assert threshold == 0.6


@pytest.mark.parametrize("labels", [[1, 1, 0, 0], [1, 0, 1, 0]])
def test_best_dice_never_splits_ties(labels):
    # 0.5 is shared by an anomalous and a normal voxel. Thresholds 0.9, 0.5, 0.1 give 2/3, 4/5, 4/6 -> 0.8.
    # Splitting the tie (taking only the anomalous 0.5) would wrongly reach 1.0.
    dice, threshold = metrics.best_dice(np.array([[0.9, 0.5, 0.5, 0.1]]), np.array([labels]))
    assert dice == pytest.approx(0.8, abs=1e-15)
    assert threshold == 0.5


def test_best_dice_is_one_global_threshold_over_a_list():
    # Image 1 alone is best at 0.8, image 2 alone at 0.2; one shared threshold has to compromise.
    scores = [np.array([[0.9, 0.8], [0.7, 0.1]]), np.array([[0.3, 0.2, 0.15]])]
    labels = [np.array([[1, 1], [0, 0]]), np.array([[1, 1, 0]])]
    # P = 4. Pooled descending: .9+ .8+ .7- .3+ .2+ .15- .1- -> Dice 2/5, 4/6, 4/7, 6/8, 8/9, 8/10, 8/11.
    dice, threshold = metrics.best_dice(scores, labels)
    assert dice == pytest.approx(8 / 9, abs=1e-15)
    assert threshold == 0.2
    assert math.isnan(metrics.best_dice(np.ones((2, 2)), np.zeros((2, 2)))[0])


# --- evaluate and input checks -----------------------------------------------------------------------------


def test_evaluate_pooled_and_per_image():
    healthy_scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    scores = [HAND_SCORES, healthy_scores]
    labels = [HAND_LABELS, np.zeros((2, 2))]
    result = metrics.evaluate(scores, labels)
    assert set(result) == {"auroc", "aupro", "best_dice", "best_threshold", "average_precision", "per_image"}
    assert result["auroc"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-15)
    assert result["aupro"] == pytest.approx(metrics.aupro(scores, labels), abs=1e-15)
    assert (result["best_dice"], result["best_threshold"]) == metrics.best_dice(scores, labels)
    first, second = result["per_image"]
    assert first["aupro"] == pytest.approx(HAND_AUPRO, abs=1e-12)
    # 4 anomalous x 5 normal pairs; wins: 0.9 beats 5, 0.8 beats 5, 0.5 beats 4, 0.2 beats 2 -> 16/20.
    assert first["auroc"] == pytest.approx(16 / 20, abs=1e-15)
    assert all(math.isnan(second[key]) for key in ("auroc", "aupro", "best_dice"))
    # Pooled, the healthy image adds normals 0.1, 0.2, 0.3, 0.4 (9 normals in all): 0.9 and 0.8 beat 9 each,
    # 0.5 beats 8, 0.2 beats 0.1, 0.0, 0.1 and ties 0.2 -> 29.5 / 36, not the mean of per-image values.
    assert result["auroc"] == pytest.approx(29.5 / 36, abs=1e-15)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        metrics.auroc(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        metrics.auroc([np.zeros((2, 2))], [np.zeros((2, 2)), np.zeros((2, 2))])
    with pytest.raises(ValueError):
        metrics.auroc(np.array([[np.nan, 1.0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError):
        metrics.aupro(HAND_SCORES, HAND_LABELS, fpr_limit=0.0)


def test_the_results_table_keeps_its_columns_under_a_long_method_name():
    from iltm.evaluate import format_table

    row = {"auroc": 0.99, "aupro": 0.9, "best_dice": 0.7, "auroc_std": 0.01, "aupro_std": 0.02, "best_dice_std": 0.1,
           "average_precision": 0.7, "scan_auroc": 0.8}
    long = "ILTM, last iteration (3), not kept"
    lines = format_table({"ILTM (iteration 0)": row, long: row}).splitlines()
    header, short_row, long_row = lines[0], lines[1], lines[2]
    # every line of the first block ends its last column at the same place, the header's "best Dice" included
    assert len(header) == len(short_row) == len(long_row) and long_row.startswith(long + " ")
    second = lines.index("") + 1
    assert len({len(line) for line in lines[second:second + 3]}) == 1
