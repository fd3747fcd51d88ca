"""What a cap on the ILTM iterations would have given, from finished sweeps: no training needed.

    python -m iltm_bench.iteration_cap SWEEP [SWEEP ...] [--caps 0 1 2 3]

Iteration k's models and masks do not depend on how many iterations follow it (each fit has its own seed), so a
run capped at ``iltm.max_iterations = K`` ends with the iteration ``min(K, last)`` of an uncapped run of the same
seed (``last``: where the uncapped loop stopped). From each sweep's ``iltm_iterations.csv`` (decreasing threshold)
this prints, per anomalous fraction and cap, the held-out AUROC / AUPRO / best Dice of that iteration as mean and
sample standard deviation over the sweeps (seeds), and each cap's difference to the largest one, paired by seed.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from iltm.evaluate import METRICS

from .sweep import ITERATIONS_CSV, read_table


def iterations_of(sweep: Path) -> dict[float, dict[int, dict[str, float]]]:
    """{fraction: {iteration: {metric: points}}} of one sweep's decreasing-threshold ILTM run."""
    out: dict[float, dict[int, dict[str, float]]] = {}
    for row in read_table(sweep / ITERATIONS_CSV):
        if row["threshold_schedule"] != "decreasing":
            continue
        out.setdefault(row["anomalous_fraction"], {})[int(row["iteration"])] = {m: 100 * row[m] for m in METRICS}
    return out


def capped(iterations: dict[int, dict[str, float]], cap: int) -> dict[str, float]:
    """The metrics of the iteration a run capped at ``cap`` ends with."""
    return iterations[min(cap, max(iterations))]


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(sweeps: list[Path], caps: list[int]) -> str:
    """Markdown: one row per fraction and cap (only fractions every sweep has)."""
    runs = [iterations_of(s) for s in sweeps]
    fractions = sorted(set.intersection(*(set(r) for r in runs)))
    top = max(caps)
    lines = ["| anomalous | cap | iterations run (per seed) | AUROC | AUPRO | best Dice | best Dice - cap "
             f"{top} (paired) |", "|---|---|---|---|---|---|---|"]
    for fraction in fractions:
        for cap in caps:
            ends = [min(cap, max(r[fraction])) for r in runs]
            cells = [_spread([capped(r[fraction], cap)[m] for r in runs]) for m in METRICS]
            diff = [capped(r[fraction], cap)["best_dice"] - capped(r[fraction], top)["best_dice"] for r in runs]
            lines.append(f"| {100 * fraction:g} % | {cap} | {', '.join(map(str, ends))} | " + " | ".join(cells) +
                         f" | {_spread(diff)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="finished sweep folders (one per seed)")
    p.add_argument("--caps", type=int, nargs="+", default=[0, 1, 2, 3], help="iteration caps to compare")
    args = p.parse_args(argv)
    missing = [s for s in args.sweeps if not (s / ITERATIONS_CSV).is_file()]
    if missing:
        p.error(f"{missing[0]}: no {ITERATIONS_CSV} (not a finished sweep folder)")
    if min(args.caps) < 0:
        p.error("--caps: an iteration cap is 0 or more")
    print(f"{len(args.sweeps)} sweeps: " + ", ".join(s.name for s in args.sweeps))
    print(table(args.sweeps, sorted(set(args.caps))))


if __name__ == "__main__":
    main()
