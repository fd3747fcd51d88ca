"""Rules taken from the training cohort itself: a resampling threshold set as a quantile of its own token
probabilities, and the label-free choice between the last ILTM iteration and iteration 0 (recorded by every run;
used by detection with iltm.select_iteration=best, as in tiny)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cli_helpers import FAST, run_cli
from iltm import config as config_mod
from iltm import train as train_mod
from iltm.checkpoint import load_checkpoint
from iltm.run import RunFolder
from iltm.transformer import TokenTransformer


def test_tiny_guards_against_a_worse_last_iteration_and_takes_a_quantile_t_in_2d():
    for name in ("paper", "small", "tiny"):
        cfg = config_mod.preset(name)
        expected = "best" if name == "tiny" else "last"
        assert cfg.iltm.selection_for(2) == expected and cfg.iltm.selection_for(3) == expected
        assert cfg.detection.quantile_for(3) is None
        assert cfg.detection.quantile_for(2) == (0.3 if name == "tiny" else None)
    with pytest.raises(Exception, match="resampling_quantile"):
        config_mod.build("tiny", overrides=["detection.resampling_quantile=1.5"])
    with pytest.raises(Exception, match="select_iteration"):
        config_mod.build("tiny", overrides=["iltm.select_iteration=first"])


def test_resampling_quantile_sets_t_from_the_held_out_token_probabilities(cohort2d, tmp_path):
    run_dir = tmp_path / "run"
    q = 0.05
    assert run_cli("train", "--data", cohort2d, "--out", run_dir, "--preset", "tiny", "--max-iterations", "1",
                   "--set", "iltm.stop_change=0", "--set", f"detection.resampling_quantile={q}", *FAST) == 0
    run = RunFolder(run_dir)
    history = run.history()
    record = history["adaptive_threshold"]
    # Recompute the quantile independently: each scan scored by the fold Transformer that did not see it.
    tokens = load_checkpoint(run.tokens_path, "iltm-tokens", 1)["tokens"]
    probs = []
    for i in range(tokens.shape[0]):
        model = TokenTransformer.load(run.fold_transformer_path(0, i % 2)).eval()
        probs.append(model.token_probabilities(tokens[i:i + 1])[0])
    expected = float(np.quantile(torch.cat(probs).double().numpy(), q))
    assert record["probabilities"] == "held-out" and record["resampling_quantile"] == q
    assert math.isclose(record["resampling_threshold"], expected, rel_tol=1e-5)
    assert record["absolute_threshold"] == config_mod.preset("tiny").detection.resampling_threshold
    assert not math.isclose(expected, record["absolute_threshold"])
    # Detection reads t from config.yaml; the iterations decay from it as from an absolute t.
    cfg = run.config()
    assert cfg.detection.resampling_threshold == record["resampling_threshold"]
    assert cfg.detection.resampling_quantile == q
    thresholds = [r["resampling_threshold"] for r in history["iterations"]]
    assert math.isclose(thresholds[0], expected, rel_tol=1e-5)
    assert math.isclose(thresholds[1], expected * (1 - cfg.iltm.threshold_decay), rel_tol=1e-5)
    # About q of the training tokens fall below t (ties between equal probabilities aside).
    below = float((torch.cat(probs) < record["resampling_threshold"]).float().mean())
    assert below <= q + 1e-9 and below > q / 2


def test_every_run_records_its_choice_and_detection_follows_select_iteration(run2d, tmp_path):
    history = json.loads((run2d / "history.json").read_text(encoding="utf-8"))
    selection = history["iteration_selection"]
    assert history["best_iteration"] in (0, 1) and history["best_iteration"] == selection["best_iteration"]
    assert history["selection_reason"] and [r["iteration"] for r in selection["per_iteration"]] == [0, 1]
    assert selection["probabilities"] == "held-out"
    if selection["reference_tokens"]:
        assert all(r["reference_nll"] > -1e-4 for r in selection["per_iteration"])
    else:  # these few-epoch test models may flag every token: then nothing can judge, and iteration 0 is kept
        assert history["best_iteration"] == 0 and "every token was flagged" in history["selection_reason"]
        assert all(r["reference_nll"] is None for r in selection["per_iteration"])
    assert history["adaptive_threshold"]["resampling_quantile"] == 0.3  # tiny in 2D
    assert RunFolder(run2d).check_for_detection() == history["detection_iteration"] == 1  # asked for the last
    copy = tmp_path / "copy"
    shutil.copytree(run2d, copy)
    cfg = config_mod.load(copy / "config.yaml")
    cfg.iltm.select_iteration = "best"
    cfg.save(copy / "config.yaml")
    history["best_iteration"] = 0
    (copy / "history.json").write_text(json.dumps(history), encoding="utf-8")
    assert RunFolder(copy).check_for_detection() == 0
    assert RunFolder(copy).check_for_detection(1) == 1  # an explicit --iteration still wins


def _fake_run(tmp_path, masks_per_iteration):
    """A run folder with only what select_iteration reads: per-iteration token masks and fold Transformer files."""
    run = RunFolder(tmp_path / "run")
    for k, masks in enumerate(masks_per_iteration):
        (run.iteration_dir(k) / "masks").mkdir(parents=True)
        run.token_mask_path(k, "s0").parent.mkdir(parents=True, exist_ok=True)
        run.fold_transformer_path(k, 0).parent.mkdir(parents=True)
        for j in range(2):  # tiny's cross-fitting folds
            run.fold_transformer_path(k, j).write_bytes(b"x")
        for i, row in enumerate(masks):
            np.save(run.token_mask_path(k, f"s{i}"), np.asarray(row, bool))
    return run


@pytest.mark.parametrize("nll, best", [((1.0, 0.9, 0.95), 2),        # the last is better than 0: kept, even if 1 was
                                       ((1.0, 1.1, 1.2), 0),         # only worse: iteration 0
                                       ((1.0, 1.3, 0.99), 2),        # a worse iteration in between does not count
                                       ((1.0, 0.8, 1.001), 0),       # a better one in between neither
                                       ((1.0, 1.2, 1.0), 2)])        # as good as iteration 0: the last
def test_the_last_iteration_is_kept_unless_it_predicts_the_never_flagged_tokens_worse(tmp_path, monkeypatch, nll,
                                                                                       best):
    # Two scans of four tokens; iteration 1 flags token 3 of scan 0, iteration 2 token 0 of scan 1.
    masks = [[[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 1], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 0, 0, 0]]]
    run = _fake_run(tmp_path, masks)

    def fake_probabilities(run, k, tokens, folds, device):
        p = torch.full(tokens.shape, math.exp(-nll[k]))
        p[0, 3] = p[1, 0] = 1e-9  # flagged by some iteration: must not count
        return p, "held-out"

    monkeypatch.setattr(train_mod, "cohort_token_probabilities", fake_probabilities)
    cfg = config_mod.preset("tiny")
    out = train_mod.select_iteration(run, cfg, torch.zeros(2, 4, dtype=torch.long), ["s0", "s1"], torch.device("cpu"))
    assert out["best_iteration"] == best
    assert out["reference_tokens"] == 6
    assert [round(r["reference_nll"], 6) for r in out["per_iteration"]] == [round(v, 6) for v in nll]
    assert [r["masked_fraction"] for r in out["per_iteration"]] == [0.0, 0.125, 0.125]
    assert out["selection_reason"].startswith("the last iteration predicted the never-flagged tokens "
                                              + ("at least as well" if best else "worse than iteration 0"))
    assert f"(mean NLL {nll[-1]:.4f} against {nll[0]:.4f} at iteration 0)" in out["selection_reason"]


@pytest.mark.parametrize("later_masks, words", [([[1, 1, 0, 0], [1, 0, 0, 0]], "grew from 25.00 % to 37.50 %"),
                                                 ([[0, 0, 0, 0], [1, 0, 0, 0]], "shrank from 25.00 % to 12.50 %"),
                                                 ([[0, 0, 1, 0], [1, 0, 0, 0]], "stayed at 25.00 %")])
def test_the_reason_for_keeping_iteration_0_says_which_way_the_masks_went(tmp_path, monkeypatch, later_masks, words):
    run = _fake_run(tmp_path, [[[1, 0, 0, 0], [0, 1, 0, 0]], later_masks])
    monkeypatch.setattr(train_mod, "cohort_token_probabilities",
                        lambda run, k, tokens, folds, device: (torch.full(tokens.shape, 0.5 / (k + 1)), "held-out"))
    out = train_mod.select_iteration(run, config_mod.preset("tiny"), torch.zeros(2, 4, dtype=torch.long),
                                     ["s0", "s1"], torch.device("cpu"))
    assert out["best_iteration"] == 0
    assert out["selection_reason"].endswith(f"while the masks {words} of the tokens: iteration 0")


def test_when_every_token_was_flagged_iteration_0_is_kept_and_says_why(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, [[[1, 1], [0, 1]], [[0, 0], [1, 0]]])
    monkeypatch.setattr(train_mod, "cohort_token_probabilities",
                        lambda run, k, tokens, folds, device: (torch.full(tokens.shape, 0.5 / (k + 1)), "held-out"))
    out = train_mod.select_iteration(run, config_mod.preset("tiny"), torch.zeros(2, 2, dtype=torch.long),
                                     ["s0", "s1"], torch.device("cpu"))
    assert out["reference_tokens"] == 0 and out["best_iteration"] == 0
    assert "every token was flagged" in out["selection_reason"]
    json.dumps(out, allow_nan=False)  # history.json stays valid JSON


def growing_masks(grow: bool):
    """A stand-in for ``train.detect_stage`` whose masks cover 3 + k tokens of every scan (6 - k without ``grow``)."""
    def fake_detect_stage(run, cfg, k, data, detectors, threshold, reporter, units):
        latent = int(np.prod([s // cfg.vqvae.downsample_factor for s in data.arrays[0].shape[1:]]))
        masks = torch.zeros(len(data), latent, dtype=torch.bool)
        masks[:, :(3 + k) if grow else (6 - k)] = True
        for i, rec in enumerate(data.records):  # what resume and the final selection read
            run.token_mask_path(k, rec.id).parent.mkdir(parents=True, exist_ok=True)
            run.mask_path(k, rec.id).parent.mkdir(parents=True, exist_ok=True)
            np.save(run.token_mask_path(k, rec.id), masks[i].numpy())
        return masks, 0.0
    return fake_detect_stage


def test_training_scores_each_iterations_cohort_once(cohort2d, tmp_path, monkeypatch):
    """The adaptive threshold and the final selection both read the iterations' cohort probabilities: each
    iteration's are computed once (not once per question)."""
    calls = []

    def counting_probabilities(run, k, tokens, folds, device):
        calls.append(k)
        return torch.full(tokens.shape, 0.5 + 0.1 * k), "held-out"  # every iteration better: the loop goes on

    monkeypatch.setattr(train_mod, "detect_stage", growing_masks(True))
    monkeypatch.setattr(train_mod, "cohort_token_probabilities", counting_probabilities)
    run_dir = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run_dir, "--preset", "tiny", "--max-iterations", "2",
                   "--set", "iltm.stop_change=0", "--set", "iltm.select_iteration=best", *FAST) == 0
    history = RunFolder(run_dir).history()
    assert [r["iteration"] for r in history["iterations"]] == [0, 1, 2] and history["best_iteration"] == 2
    assert "adaptive_threshold" in history  # iteration 0 was asked for by the threshold and three selections
    assert sorted(calls) == [0, 1, 2]


@pytest.mark.parametrize("last_nll, kept", [(1.3, 0), (0.9, 2)])
def test_masks_that_grow_do_not_stop_the_loop_and_a_worse_last_iteration_falls_back_to_0(cohort2d, tmp_path,
                                                                                         monkeypatch, last_nll, kept):
    """Growing masks with a worse model (iteration 1) once stopped the loop; measured, that cut ILTM short on the
    phantom, where a later iteration recovers (docs/research.md). Every iteration runs; detection then uses the last
    one or, if it predicts the never-flagged tokens worse than iteration 0, iteration 0 (its full-cohort model too)."""
    nll = {0: 1.0, 1: 1.2, 2: last_nll}
    monkeypatch.setattr(train_mod, "detect_stage", growing_masks(True))
    monkeypatch.setattr(train_mod, "cohort_token_probabilities",
                        lambda run, k, tokens, folds, device: (torch.full(tokens.shape, math.exp(-nll[k])), "held-out"))
    run_dir = tmp_path / "run"
    assert run_cli("train", "--data", cohort2d, "--out", run_dir, "--preset", "tiny", "--max-iterations", "2",
                   "--set", "iltm.stop_change=0", *FAST) == 0
    run = RunFolder(run_dir)
    history = run.history()
    assert [r["iteration"] for r in history["iterations"]] == [0, 1, 2]
    assert history["stop_reason"] == "reached --max-iterations (2)"
    assert history["best_iteration"] == history["detection_iteration"] == kept
    assert run.check_for_detection() == kept and run.transformer_path(kept).is_file()
    assert not run.transformer_path(2 - kept).is_file()  # tiny fits only the full model detection uses


def test_the_rules_may_be_set_per_dimension():
    cfg = config_mod.build("tiny", overrides=["detection.resampling_quantile={2d: 0.3}",
                                              "iltm.select_iteration={2d: best}"])
    assert cfg.detection.quantile_for(2) == 0.3 and cfg.detection.quantile_for(3) is None
    assert cfg.iltm.selection_for(2) == "best" and cfg.iltm.selection_for(3) == "last"
    with pytest.raises(Exception, match="select_iteration"):
        config_mod.build("tiny", overrides=["iltm.select_iteration={2d: first}"])
    with pytest.raises(Exception, match="resampling_quantile"):
        config_mod.build("tiny", overrides=["detection.resampling_quantile={3d: 2}"])
