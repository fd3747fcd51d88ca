"""One table per sweep of the pieces issue 22 asks for: the test metrics of the intensity reference, iteration 0, the
last ILTM iteration and the iteration training recorded as best (label-free), and per iteration the label-free
selection's reference NLL beside the training masks' precision and recall against the training labels.

    python -m iltm_bench.family_report SWEEP OUT_DIR

Writes ``OUT_DIR/summary.csv``, ``OUT_DIR/iterations.csv`` and ``OUT_DIR/report.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from iltm.run import RunFolder

from .sweep import ITERATIONS_CSV, SWEEP_CSV, read_table
from .training_masks import mask_coverage

METRICS = ("auroc", "aupro", "best_dice")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def report(sweep: Path, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    sweep_rows = read_table(sweep / SWEEP_CSV)
    iteration_rows = [r for r in read_table(sweep / ITERATIONS_CSV) if r["threshold_schedule"] == "decreasing"]
    summary, per_iteration, lines = [], [], []
    settings = json.loads((sweep / "benchmark.json").read_text(encoding="utf-8"))
    lines.append(f"Sweep `{sweep.name}`: `{settings['invocations'][-1]['command']}`\n")
    for fraction in sorted({float(r["anomalous_fraction"]) for r in iteration_rows}):
        run = RunFolder(sweep / f"fraction_{fraction:g}" / "runs" / "iltm")
        history = run.history()
        its = {int(r["iteration"]): r for r in iteration_rows if float(r["anomalous_fraction"]) == fraction}
        best = history.get("best_iteration")
        entries = [("intensity", None, next((r for r in sweep_rows if r["method"] == "intensity"), None)),
                   ("iteration 0", 0, its.get(0)), ("last ILTM iteration", max(its), its[max(its)]),
                   ("best iteration (label-free)", best, its.get(best))]
        for name, k, row in entries:
            if row is not None:
                summary.append({"anomalous_fraction": fraction, "method": name, "iteration": k,
                                **{m: round(float(row[m]), 4) for m in METRICS}})
        coverage = {r["iteration"]: r for r in mask_coverage(run, sweep / f"fraction_{fraction:g}" / "train" / "labels")}
        selection = {r["iteration"]: r for r in (history.get("iteration_selection") or {}).get("per_iteration", [])}
        for k, row in sorted(its.items()):
            per_iteration.append({"anomalous_fraction": fraction, "iteration": k,
                                  **{m: round(float(row[m]), 4) for m in METRICS},
                                  "resampling_threshold": row["resampling_threshold"],
                                  "masked_fraction": row["masked_fraction"],
                                  "reference_nll": selection.get(k, {}).get("reference_nll"),
                                  "mask_precision": coverage.get(k, {}).get("precision"),
                                  "mask_recall": coverage.get(k, {}).get("recall")})
        lines.append(f"{100 * fraction:g} % anomalous; best iteration {best}: {history.get('selection_reason')}\n")
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "iterations.csv", per_iteration)
    lines += ["| fraction | method | iteration | AUROC | AUPRO | best Dice |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['anomalous_fraction']:g} | {r['method']} | {'' if r['iteration'] is None else r['iteration']} | "
              f"{100 * r['auroc']:.1f} | {100 * r['aupro']:.1f} | {100 * r['best_dice']:.1f} |" for r in summary]
    lines += ["", "| fraction | iteration | t | masked tokens | reference NLL | mask precision | mask recall | "
                  "AUROC | best Dice |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, scale=100, d=1: "" if v in (None, "") else f"{scale * float(v):.{d}f}"  # noqa: E731
    lines += [f"| {r['anomalous_fraction']:g} | {r['iteration']} | {float(r['resampling_threshold']):.4f} | "
              f"{fmt(r['masked_fraction'])} % | {fmt(r['reference_nll'], 1, 4)} | {fmt(r['mask_precision'])} % | "
              f"{fmt(r['mask_recall'])} % | {fmt(r['auroc'])} | {fmt(r['best_dice'])} |" for r in per_iteration]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(report(args.sweep, args.out))


if __name__ == "__main__":
    main()
