"""Testing/Benchmarks/mask_ceiling.py: iteration 1 refitted with perfect masks and with none, on a tiny sweep."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import FAST, run_cli
from iltm.errors import InputError
from iltm.progress import Reporter
from iltm.run import RunFolder


@pytest.fixture(scope="module")
def mask_ceiling():
    return importlib.import_module("iltm_bench.mask_ceiling")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ceiling") / "sweep"
    assert run_cli("benchmark", "--out", out, "--dims", "2", "--preset", "tiny", "--fractions", "1", "--n-train", "6",
                   "--n-test", "4", "--size", "32", "32", "--max-iterations", "1", "--methods", "iltm",
                   "--device", "cpu", *FAST) == 0
    return out


def test_truth_masks_are_the_tokens_holding_a_lesion_voxel(mask_ceiling, sweep):
    source = RunFolder(sweep / "fraction_1" / "runs" / "iltm")
    labels = sweep / "fraction_1" / "train" / "labels"
    truth = mask_ceiling.truth_token_masks(source, labels)
    for i, rec in enumerate(source.manifest()["images"]):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f"{rec['id']}.nii.gz"))) > 0
        blocks = label.reshape(8, 4, 8, 4).any(axis=(1, 3))           # 32x32 grid, 4x4 token footprints
        assert np.array_equal(truth[i].numpy(), blocks.reshape(-1))
    assert truth.any()                                                 # every scan is anomalous at 100 %


def test_the_ceiling_fits_iteration_1_per_variant_and_tables_it_beside_the_sweep(mask_ceiling, sweep, capsys):
    assert mask_ceiling.main([str(sweep), "--fraction", "1", "--variants", "truth", "none"]) == 0
    out = capsys.readouterr().out
    table = (sweep / "mask_ceiling_1.md").read_text(encoding="utf-8")
    assert table == out
    for what in ("sweep: iteration 0", "sweep: iteration 1, its own masks", "iteration 1, perfect masks (the labels)",
                 "iteration 1, no masks"):
        assert f"| {what} |" in table, what
    n_truth = int(mask_ceiling.truth_token_masks(RunFolder(sweep / "fraction_1" / "runs" / "iltm"),
                                                 sweep / "fraction_1" / "train" / "labels").sum())
    assert f"| iteration 1, perfect masks (the labels) | {n_truth} |" in table and "| iteration 1, no masks | 0 |" in table
    for variant in ("truth", "none"):
        run = RunFolder(sweep / "fraction_1" / "ceiling" / variant / "run")
        assert run.transformer_path(1).is_file()
        assert len(list((sweep / "fraction_1" / "ceiling" / variant / "scores").glob("*_score.nii.gz"))) == 4
    # The refit is the loop's own: with no masks it is iteration 1's Transformer fitted on unmasked tokens, so
    # the truth and none fits differ only through the masks.
    a = torch.load(RunFolder(sweep / "fraction_1" / "ceiling" / "truth" / "run").transformer_path(1),
                   weights_only=False)
    b = torch.load(RunFolder(sweep / "fraction_1" / "ceiling" / "none" / "run").transformer_path(1),
                   weights_only=False)
    assert a["extra"]["losses"] != b["extra"]["losses"]


def test_a_folder_without_a_sweep_is_a_clear_error(mask_ceiling, tmp_path):
    with pytest.raises(InputError, match="benchmark.json"):
        mask_ceiling.ceiling(tmp_path, 1.0, ["truth"], "cpu", None)


def test_right_and_wrong_split_the_runs_own_masks_by_the_labels(mask_ceiling, sweep, capsys):
    source = RunFolder(sweep / "fraction_1" / "runs" / "iltm")
    truth = mask_ceiling.truth_token_masks(source, sweep / "fraction_1" / "train" / "labels")
    own = mask_ceiling.own_token_masks(source)
    stored = np.stack([np.load(source.token_mask_path(0, rec["id"])) for rec in source.manifest()["images"]])
    assert np.array_equal(own.numpy(), stored.astype(bool)) and own.any()
    right, wrong = (mask_ceiling.variant_masks(v, truth, own) for v in ("right", "wrong"))
    assert torch.equal(right | wrong, own) and not (right & wrong).any()
    assert not (right & ~truth).any() and not (wrong & truth).any()
    with pytest.raises(InputError, match="iteration-0 masks"):
        mask_ceiling.variant_masks("right", truth)
    assert mask_ceiling.main([str(sweep), "--fraction", "1", "--variants", "wrong"]) == 0
    table = capsys.readouterr().out
    assert f"| iteration 1, its own masks' normal tokens only | {int(wrong.sum())} |" in table


def test_dilated_and_clean_fit_the_labels_grown_by_a_token_and_the_same_subjects_without_lesions(mask_ceiling, sweep,
                                                                                                  monkeypatch):
    from iltm.checkpoint import load_checkpoint
    from iltm.synth import make_cohort
    with pytest.raises(InputError, match="0 % cohort"):
        mask_ceiling.ceiling(sweep, 1.0, ["clean"], "cpu", Reporter("none"))
    # The sweep's 0 % cohort as 'iltm benchmark --fractions 0' draws it: same seed, so the same subjects.
    make_cohort(sweep / "fraction_0" / "train", dims=2, n=6, anomalous_fraction=0.0, seed=0, size=(32, 32))
    encoded = []
    tokenize = mask_ceiling.tokenize_stage

    def recording_tokenize(run, data, *args):
        encoded.extend(rec.image for rec in data.records)
        return tokenize(run, data, *args)

    monkeypatch.setattr(mask_ceiling, "tokenize_stage", recording_tokenize)
    assert mask_ceiling.main([str(sweep), "--fraction", "1", "--variants", "dilated", "clean"]) == 0
    table = (sweep / "mask_ceiling_1.md").read_text(encoding="utf-8")
    source = RunFolder(sweep / "fraction_1" / "runs" / "iltm")
    truth = mask_ceiling.truth_token_masks(source, sweep / "fraction_1" / "train" / "labels")
    dilated = mask_ceiling.variant_masks("dilated", truth, latent=mask_ceiling.latent_shape(source))
    assert mask_ceiling.latent_shape(source) == [8, 8]
    assert (dilated & truth).sum() == truth.sum() and dilated.sum() > truth.sum()
    assert f"| iteration 1, the labels' tokens and their neighbours | {int(dilated.sum())} |" in table
    assert "| iteration 1, no masks, the same subjects without lesions | 0 |" in table
    # The clean fit encoded the 0 % cohort's images (the same ids), with the run's VQ-VAE, into its own folder.
    assert [Path(p).parent for p in encoded] == [sweep / "fraction_0" / "train" / "images"] * 6
    assert [Path(p).name for p in encoded] == [f"{rec['id']}.nii.gz" for rec in source.manifest()["images"]]
    clean_run = RunFolder(sweep / "fraction_1" / "ceiling" / "clean" / "run")
    assert load_checkpoint(clean_run.tokens_path, "iltm-tokens", 1)["tokens"].shape == (6, 64)
    assert clean_run.transformer_path(1).is_file() and source.tokens_path.is_file()
    # How far the lesions reach into the codes: every token counted once, the lesion tokens at distance 0.
    tokens, clean = (load_checkpoint(r.tokens_path, "iltm-tokens", 1)["tokens"] for r in (source, clean_run))
    changes = mask_ceiling.clean_code_changes(sweep, 1.0)
    assert sum(c["tokens"] for c in changes) == tokens.numel()
    assert changes[0] == {"distance": "0", "tokens": int(truth.sum()),
                          "changed": int(((tokens != clean) & truth).sum())}
    assert changes[1]["tokens"] == int((dilated & ~truth).sum())
    assert sum(c["changed"] for c in changes) == int((tokens != clean).sum())
    assert "| distance (tokens) | tokens | changed |" in table and f"| 0 | {int(truth.sum())} |" in table


def test_refits_fit_each_variant_with_other_seeds_and_table_the_mean_and_spread(mask_ceiling, sweep, capsys):
    from iltm_bench.sweep import metrics_of

    assert mask_ceiling.main([str(sweep), "--fraction", "1", "--variants", "none", "--refits", "2"]) == 0
    table = capsys.readouterr().out
    where = sweep / "fraction_1" / "ceiling" / "none"
    fits = [torch.load(RunFolder(w / "run").transformer_path(1), weights_only=False) for w in (where, where / "refit1")]
    assert fits[0]["extra"]["losses"] != fits[1]["extra"]["losses"]   # another seed, another fit
    dice = [metrics_of(w / "scores", sweep / "test" / "labels")["best_dice"] for w in (where, where / "refit1")]
    row = next(line for line in table.splitlines() if line.startswith("| iteration 1, no masks |"))
    assert f"| {100 * np.mean(dice):.2f} ± {100 * np.std(dice, ddof=1):.2f} |" in row
    assert "mean ± sd over 2 seeds" in table
    with pytest.raises(InputError, match="--refits"):
        mask_ceiling.ceiling(sweep, 1.0, ["none"], "cpu", Reporter("none"), refits=0)


def test_code_changes_count_the_changed_codes_by_distance_from_the_nearest_lesion_token(mask_ceiling):
    truth = torch.zeros(1, 16, dtype=torch.bool)
    truth[0, 5] = True                                                   # token (1, 1) of a 4 x 4 grid
    clean = torch.zeros(1, 16, dtype=torch.long)
    tokens = clean.clone()
    tokens[0, [5, 10, 15]] = 7                                           # (1, 1), (2, 2), (3, 3): distances 0, 1, 2
    changes = mask_ceiling.code_changes(tokens, clean, truth, [4, 4], farthest=1)
    assert changes == [{"distance": "0", "tokens": 1, "changed": 1}, {"distance": "1", "tokens": 8, "changed": 1},
                       {"distance": "more than 1", "tokens": 7, "changed": 1}]
