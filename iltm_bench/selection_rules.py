"""What label-free rules for the iteration detection uses would have given, from finished runs: no training needed.

    python -m iltm_bench.selection_rules TABLE [TABLE ...] [--tolerances 0 0.003 0.01]

Each TABLE is a ``family_report`` ``iterations.csv``: one row per run and iteration with the held-out metrics and
the label-free record of training (``reference_nll``: the mean NLL of the training tokens that no iteration's masks
flagged, under that iteration's held-out fold Transformers; ``masked_fraction``). Rules compared:

- the last iteration (``iltm.select_iteration=last``) and iteration 0;
- the guard at tolerance e: the last iteration unless its reference NLL is above iteration 0's times (1 + e), then
  iteration 0 (``iltm.select_iteration=best`` is e = 0);
- the guard with a stop: the run ends, keeping iteration 0, at the first iteration before the last whose masks grew
  while its reference NLL was above iteration 0's (the stop signal of an earlier ``best``). Approximate: a stopped
  run's never-flagged tokens would be those of fewer iterations.

Per table and rule: how many runs end within 0.2 AUROC points of their iteration 0 (issue 22's bar), and the mean
best-Dice change against iteration 0 over the runs at 50 % anomalous or more, in all and per data family.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from iltm.train import kept_iteration

from .sweep import read_table

AUROC_BAR = 0.002  # "at least iteration 0 within 0.2 points" (AUROC as a fraction)


def runs_of(table: Path) -> dict[tuple, list[dict]]:
    """{(sweep, group, seed, fraction): rows by iteration} of one ``iterations.csv``; runs without a reference NLL
    (every token flagged, or runs from before it was recorded) are left out."""
    runs: dict[tuple, list[dict]] = {}
    for row in read_table(table):
        key = (row["sweep"], row["group"], row["seed"], row["anomalous_fraction"])
        runs.setdefault(key, []).append(row)
    return {k: sorted(v, key=lambda r: r["iteration"]) for k, v in runs.items()
            if all(r["reference_nll"] is not None for r in v)}


def guard(rows: list[dict], tolerance: float = 0.0) -> dict:
    """The row of the iteration training's rule keeps (``iltm.train.kept_iteration``): the last unless its reference
    NLL is above iteration 0's by more than ``tolerance`` of it."""
    return rows[-1] if kept_iteration(rows, tolerance) == rows[-1]["iteration"] else rows[0]


def guard_with_stop(rows: list[dict]) -> dict:
    """The guard, in a loop that stops (keeping iteration 0) once masks grow while the model is worse than 0's."""
    for prev, row in zip(rows[:-1], rows[1:-1]):
        if row["masked_fraction"] > prev["masked_fraction"] and row["reference_nll"] > rows[0]["reference_nll"]:
            return rows[0]
    return guard(rows)


def rules(tolerances: list[float]) -> dict:
    out = {"the last iteration": lambda rows: rows[-1], "iteration 0": lambda rows: rows[0]}
    for e in tolerances:
        out[f"the guard, tolerance {100 * e:g} %"] = lambda rows, e=e: guard(rows, e)
    out["the guard with the stop"] = guard_with_stop
    return out


def score(runs: dict[tuple, list[dict]], rule) -> dict:
    """{"bar": runs within the AUROC bar, "runs": n, "dice": mean change at >= 50 %, "families": {family: (mean, n)}}."""
    bar, dice, families = 0, [], {}
    for (_, group, _, fraction), rows in runs.items():
        chosen = rule(rows)
        bar += chosen["auroc"] >= rows[0]["auroc"] - AUROC_BAR
        if fraction >= 0.5:
            change = 100 * (chosen["best_dice"] - rows[0]["best_dice"])
            dice.append(change)
            families.setdefault(str(group).split(",")[0], []).append(change)
    return {"bar": bar, "runs": len(runs), "dice": statistics.mean(dice) if dice else None,
            "families": {f: (statistics.mean(v), len(v)) for f, v in sorted(families.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iltm_bench.selection_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", type=Path, help="family_report iterations.csv files")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.0, 0.003, 0.01])
    args = parser.parse_args(argv)
    for table in args.tables:
        runs = runs_of(table) if table.is_file() else {}
        if not runs:
            parser.error(f"{table}: no run with a reference NLL per iteration (not a family_report iterations.csv)")
        print(f"\n{table} ({len(runs)} runs)\n")
        print("| rule | runs within 0.2 AUROC of iteration 0 | best Dice - iteration 0, >= 50 % | per family |")
        print("|---|---|---|---|")
        for name, rule in rules(args.tolerances).items():
            s = score(runs, rule)
            dice = "" if s["dice"] is None else f"{s['dice']:+.1f}"
            fams = ", ".join(f"{f} {m:+.1f} (n={n})" for f, (m, n) in s["families"].items())
            print(f"| {name} | {s['bar']}/{s['runs']} | {dice} | {fams} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
