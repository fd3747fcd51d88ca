"""iltm_bench.selection_rules: label-free choices of the detection iteration scored on per-iteration tables."""

from __future__ import annotations

import csv

import pytest

from iltm_bench import selection_rules

COLUMNS = ["sweep", "group", "seed", "anomalous_fraction", "iteration", "auroc", "best_dice", "reference_nll",
           "masked_fraction"]


def table(tmp_path, runs):
    """runs: {(group, fraction): [(auroc, best_dice, reference_nll, masked_fraction) per iteration]}."""
    path = tmp_path / "iterations.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for (group, fraction), rows in runs.items():
            for k, row in enumerate(rows):
                w.writerow([f"s_{group}_{fraction}", group, 0, fraction, k, *["" if v is None else v for v in row]])
    return path


def test_the_guard_falls_back_to_0_only_when_the_last_is_worse_and_the_stop_cuts_a_recovering_run(tmp_path):
    path = table(tmp_path, {
        # phantom: iteration 2 worse than 0 with grown masks, the last better: the guard keeps 3, the stop keeps 0
        ("phantom, q", 1.0): [(0.990, 0.50, 1.00, 0.01), (0.991, 0.54, 0.99, 0.02), (0.990, 0.54, 1.01, 0.03),
                              (0.993, 0.58, 0.98, 0.03)],
        # anatomy: the last is worse than 0 (NLL 1.004, 0.4 % above): the guard keeps 0, a 1 % tolerance the last
        ("anatomy, q", 0.5): [(0.930, 0.20, 1.00, 0.02), (0.920, 0.25, 1.004, 0.02)],
        # a run whose every token was flagged has no reference NLL: left out
        ("texture, q", 0.0): [(0.88, 0.2, None, 0.5), (0.87, 0.2, None, 0.6)],
    })
    runs = selection_rules.runs_of(path)
    assert len(runs) == 2
    phantom = runs[("s_phantom, q_1.0", "phantom, q", 0.0, 1.0)]
    anatomy = runs[("s_anatomy, q_0.5", "anatomy, q", 0.0, 0.5)]
    assert selection_rules.guard(phantom)["iteration"] == 3
    assert selection_rules.guard_with_stop(phantom)["iteration"] == 0
    assert selection_rules.guard(anatomy)["iteration"] == 0
    assert selection_rules.guard(anatomy, 0.01)["iteration"] == 1
    rules = selection_rules.rules([0.0, 0.01])
    last = selection_rules.score(runs, rules["the last iteration"])
    # the last: phantom within the bar (+8 Dice), anatomy 1 AUROC point below its iteration 0 (+5 Dice)
    assert last["bar"] == 1 and last["runs"] == 2 and last["dice"] == pytest.approx(6.5)
    guarded = selection_rules.score(runs, rules["the guard, tolerance 0 %"])
    assert guarded["bar"] == 2 and guarded["families"] == {"anatomy": (0.0, 1), "phantom": (pytest.approx(8.0), 1)}
    stopped = selection_rules.score(runs, rules["the guard with the stop"])
    assert stopped["bar"] == 2 and stopped["dice"] == 0.0


def test_a_table_without_reference_nlls_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        selection_rules.main([str(tmp_path / "missing.csv")])
    assert "missing.csv: no run with a reference NLL per iteration" in capsys.readouterr().err
