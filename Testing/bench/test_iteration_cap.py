"""iltm_bench.iteration_cap: what a cap on the ILTM iterations would have given, from sweep folders written here."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from iltm_bench import iteration_cap
from iltm_bench.sweep import ITERATION_COLUMNS, ITERATIONS_CSV


def fake_sweep(root: Path, dices: dict[float, list[float]]) -> Path:
    """A sweep whose decreasing-threshold run at each fraction scored dices[fraction][k] best Dice at iteration k
    (AUROC 0.99, AUPRO 0.9), and a constant-threshold row that must be ignored."""
    root.mkdir(parents=True)
    rows = [{"threshold_schedule": "decreasing", "anomalous_fraction": f, "iteration": k, "auroc": 0.99,
             "aupro": 0.9, "best_dice": d} for f, ds in dices.items() for k, d in enumerate(ds)]
    rows.append({"threshold_schedule": "constant", "anomalous_fraction": 1.0, "iteration": 5, "auroc": 0.1,
                 "aupro": 0.1, "best_dice": 0.0})
    with (root / ITERATIONS_CSV).open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ITERATION_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    return root


def test_a_cap_ends_at_the_iteration_an_early_stop_left(tmp_path):
    # Seed a stopped after iteration 1 at 100 %; seed b ran all four iterations.
    a = fake_sweep(tmp_path / "a", {1.0: [0.50, 0.60], 0.0: [0.7, 0.7, 0.7, 0.7]})
    b = fake_sweep(tmp_path / "b", {1.0: [0.40, 0.44, 0.46, 0.48]})
    runs = [iteration_cap.iterations_of(s) for s in (a, b)]
    assert iteration_cap.capped(runs[0][1.0], 3)["best_dice"] == pytest.approx(60.0)
    assert iteration_cap.capped(runs[1][1.0], 1)["best_dice"] == pytest.approx(44.0)
    text = iteration_cap.table([a, b], [0, 1, 3])
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 100 %")}
    # Cap 1: 60 and 44 (mean 52.00); paired against cap 3 (60 and 48): 0 and -4 (mean -2.00, sd 2.83).
    assert "| 1, 1 |" in lines["1"] and "52.00 ± 11.31" in lines["1"] and lines["1"].endswith("-2.00 ± 2.83 |")
    assert "| 1, 3 |" in lines["3"] and lines["3"].endswith("0.00 ± 0.00 |")
    assert "| 0 % |" not in text  # only fractions every sweep ran
    assert "10.00" not in text  # the constant-threshold row is not read


def test_a_folder_without_the_table_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        iteration_cap.main([str(tmp_path)])
    assert f"{tmp_path}: no {ITERATIONS_CSV}" in capsys.readouterr().err
