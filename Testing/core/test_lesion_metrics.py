"""Voxel AP, scan AUROC and autoPET's region-level figures, against scikit-learn and hand-built cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score

from cli_helpers import run_cli
from iltm import metrics


def test_average_precision_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = [np.round(rng.normal(size=(6, 7, 5)), 1), np.round(rng.normal(size=(9, 4)), 1)]  # many ties
    labels = [rng.random((6, 7, 5)) < 0.2, rng.random((9, 4)) < 0.3]
    labels[0][scores[0] > 1.0] = True
    expected = average_precision_score(np.concatenate([y.ravel() for y in labels]),
                                       np.concatenate([s.ravel() for s in scores]))
    assert metrics.average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.evaluate(scores, labels)["average_precision"] == pytest.approx(expected, abs=1e-12)


def test_lesion_detection_is_18_connected_like_autopet():
    label = np.zeros((5, 8, 8), bool)
    label[1, 1:3, 1:3] = True         # lesion A, 4 voxels: hit
    label[3, 6, 6] = True             # lesion B, 1 voxel: missed
    prediction = np.zeros_like(label)
    prediction[1, 2, 2] = True        # overlaps A
    prediction[2, 3, 3] = True        # touches the first only at a corner: its own region under 18-connectivity,
    #                                   and it shares no voxel with a lesion -> false positive
    prediction[0, 6, 0] = prediction[0, 7, 0] = True  # a 2-voxel false positive
    prediction[4, 0, 7] = True        # face-adjacent to nothing true: false positive
    result = metrics.lesion_detection(prediction, label, voxel_ml=0.5)
    assert result == {"lesions": 2, "detected_lesions": 1, "predicted_regions": 4, "fp_regions": 3,
                      "fp_volume_ml": 4 * 0.5, "fn_volume_ml": 1 * 0.5}
    # Edge contact joins under 18-connectivity: the corner voxel moved to share an edge joins the hit region.
    prediction[2, 3, 3] = False
    prediction[2, 3, 2] = True
    assert metrics.lesion_detection(prediction, label)["fp_regions"] == 2


def test_lesion_detection_2d_and_empty():
    label = np.zeros((4, 4), bool)
    assert metrics.lesion_detection(np.zeros((4, 4)), label) == {
        "lesions": 0, "detected_lesions": 0, "predicted_regions": 0, "fp_regions": 0,
        "fp_volume_ml": 0.0, "fn_volume_ml": 0.0}
    label[0, 0] = True
    prediction = np.zeros((4, 4), bool)
    prediction[1, 1] = True  # diagonal: one 8-connected region in 2D, but no shared voxel -> FP and FN
    r = metrics.lesion_detection(prediction, label)
    assert (r["fp_regions"], r["detected_lesions"], r["fn_volume_ml"]) == (1, 0, 1.0)


def _write(array, path, spacing):
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _results_folder(tmp_path, with_masks=True):
    rng = np.random.default_rng(1)
    scores_dir, labels_dir = tmp_path / "scores", tmp_path / "labels"
    scores_dir.mkdir()
    labels_dir.mkdir()
    spacing = (2.0, 2.0, 2.5)  # 10 mm^3 = 0.01 mL per voxel
    cases = {}
    for k in range(4):
        label = np.zeros((6, 8, 8), np.uint8)
        if k < 2:
            label[2:4, 2:4, 2:4] = 1              # one 8-voxel lesion in scans 0 and 1
        score = rng.normal(size=label.shape).astype(np.float32) + 3.0 * label
        mask = np.zeros_like(label)
        if k == 0:
            mask[3, 3, 3] = 1                     # detects the lesion
            mask[0, 0, 0:3] = 1                   # and a 3-voxel false positive
        if k == 3:
            mask[5, 7, 7] = 1                     # a 1-voxel false positive in a healthy scan
        _write(score, scores_dir / f"s{k}_score.nii.gz", spacing)
        _write(label, labels_dir / f"s{k}.nii.gz", spacing)
        if with_masks:
            _write(mask, scores_dir / f"s{k}_mask.nii.gz", spacing)
        cases[k] = (score, label)
    return scores_dir, labels_dir, cases


def test_evaluate_cli_reports_lesion_and_scan_metrics(tmp_path, capsys):
    scores_dir, labels_dir, cases = _results_folder(tmp_path)
    assert run_cli("evaluate", "--scores", scores_dir, "--labels", labels_dir) == 0
    printed = capsys.readouterr().out
    assert "scan AUROC" in printed and "FP vol mL" in printed
    m = json.loads((scores_dir / "metrics.json").read_text(encoding="utf-8"))
    scores = [cases[k][0] for k in range(4)]
    labels = [cases[k][1] for k in range(4)]
    assert m["average_precision"] == pytest.approx(average_precision_score(
        np.concatenate([y.ravel() for y in labels]), np.concatenate([s.ravel() for s in scores])), abs=1e-9)
    assert m["scan_auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [s.max() for s in scores]))
    assert m["fp_volume_ml"] == pytest.approx((3 + 1) * 0.01 / 4)    # mean per scan
    assert m["fn_volume_ml"] == pytest.approx(8 * 0.01 / 4)          # scan 1's lesion is missed
    assert m["lesion_sensitivity"] == pytest.approx(0.5)
    assert m["fp_regions_per_scan"] == pytest.approx(2 / 4)
    assert m["per_image"][0]["fp_regions"] == 1 and m["per_image"][1]["fn_volume_ml"] == pytest.approx(0.08)


def test_evaluate_without_masks_warns_and_partial_masks_fail(tmp_path, capsys):
    scores_dir, labels_dir, _ = _results_folder(tmp_path, with_masks=False)
    assert run_cli("evaluate", "--scores", scores_dir, "--labels", labels_dir) == 0
    err = capsys.readouterr().err
    assert "no *_mask.nii.gz beside the score maps" in err
    m = json.loads((scores_dir / "metrics.json").read_text(encoding="utf-8"))
    assert "fp_volume_ml" not in m and "scan_auroc" in m
    _write(np.zeros((6, 8, 8), np.uint8), scores_dir / "s0_mask.nii.gz", (2.0, 2.0, 2.5))
    (scores_dir / "metrics.json").unlink()
    assert run_cli("evaluate", "--scores", scores_dir, "--labels", labels_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"iltm: error: {scores_dir / 's1_mask.nii.gz'}: is missing: the lesion-level metrics need the "
                   "binary map of every scan (iltm detect writes it beside the score map)"]
    assert not (scores_dir / "metrics.json").exists()
