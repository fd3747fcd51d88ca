"""iltm_bench.mask_rules: the training masks of other tau rules, scored against labels."""

from __future__ import annotations

import math

import numpy as np
import torch

from iltm.detect import token_mask_from_map
from iltm.run import RunFolder
from iltm_bench import mask_rules


def test_a_rule_masks_tokens_whose_footprint_holds_a_voxel_below_tau():
    # One 4 x 4 scan of 2 x 2 tokens: voxel (0, 0) is far below tau, so token (0, 0) is masked, and only it.
    log_density = np.zeros((1, 4, 4))
    log_density[0, 0, 0] = -10.0
    truth = np.zeros((1, 4, 4), bool)
    truth[0, 1, 1] = truth[0, 3, 3] = True  # one lesion voxel inside the masked token, one outside
    r = mask_rules.evaluate(log_density, truth, 2, math.log(0.01))
    assert r["tokens"] == 0.25
    assert r["precision"] == 1 / 4 and r["recall"] == 1 / 2
    rows = {row["rule"]: row for row in mask_rules.rules(log_density, truth, 2)}
    assert rows["absolute tau 0.05"]["tokens"] == 0.25
    # Half the voxels at the median: the MAD is 0, so the robust rule flags only what lies below the median.
    assert rows["median - 3 MAD"]["tokens"] == 0.25


def test_the_log_densities_are_those_training_masked(run2d, cohort2d):
    """Thresholded at the run's own mask tau, the recomputed log densities give the masks training stored."""
    run = RunFolder(run2d)
    log_density, truth, factor = mask_rules.held_out_log_densities(run, cohort2d / "labels", 0)
    tau = run.config().iltm.mask_density_threshold
    ids = [e["id"] for e in run.manifest()["images"]]
    stored = np.stack([np.load(run.token_mask_path(0, i)) for i in ids]).reshape(len(ids), -1)
    again = np.stack([token_mask_from_map(torch.from_numpy(v), factor).numpy().reshape(-1)
                      for v in log_density < math.log(tau)])
    assert again.shape == stored.shape and (again == stored).all()
    assert truth.shape == log_density.shape and truth.any()
