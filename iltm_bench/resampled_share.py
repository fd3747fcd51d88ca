"""What share of a cohort's tokens a resampling threshold t sends to resampling: for each run, the training scans'
own token probabilities under iteration k (each scan scored by the fold Transformer that did not see it where the
run cross-fits, as a new scan would be by the full one), the share below each t and the quantiles of p.

    python -m iltm_bench.resampled_share RUN [RUN ...] [--iteration 0] [--thresholds 0.1 0.01 0.005]

An absolute t that suits one kind of data can resample most tokens of another (textures and anatomy spread their
probability over more codes than the phantom); ``detection.resampling_quantile`` fixes the share instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from iltm.checkpoint import load_checkpoint
from iltm.run import RunFolder
from iltm.train import cohort_token_probabilities

THRESHOLDS = (0.1, 0.05, 0.01, 0.005, 0.001)
QUANTILES = (0.05, 0.1, 0.3, 0.5)


def shares(run_dir: Path, iteration: int = 0, thresholds=THRESHOLDS, quantiles=QUANTILES) -> dict:
    """{"probabilities": held-out | in-sample, "tokens": n, "below": {t: share}, "quantiles": {q: p}} of one run."""
    run = RunFolder(run_dir)
    tokens = load_checkpoint(run.tokens_path, "iltm-tokens", 1, what="token cache", required=("tokens",))["tokens"]
    probs, source = cohort_token_probabilities(run, iteration, tokens, run.config().iltm.cross_fit_folds,
                                               torch.device("cpu"))
    p = probs.double().numpy().ravel()
    return {"probabilities": source, "tokens": int(p.size),
            "below": {float(t): float((p < t).mean()) for t in thresholds},
            "quantiles": {float(q): float(np.quantile(p, q)) for q in quantiles}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iltm_bench.resampled_share", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders (iltm train)")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    args = parser.parse_args(argv)
    header = "| run | p from | tokens | " + " | ".join(f"p < {t:g}" for t in args.thresholds) + " | " + \
             " | ".join(f"{q:g}-quantile of p" for q in QUANTILES) + " |"
    print(header)
    print("|---" * (3 + len(args.thresholds) + len(QUANTILES)) + "|")
    for run_dir in args.runs:
        s = shares(run_dir, args.iteration, args.thresholds)
        print(f"| {run_dir} | {s['probabilities']} | {s['tokens']} | "
              + " | ".join(f"{100 * v:.1f} %" for v in s["below"].values()) + " | "
              + " | ".join(f"{v:.3g}" for v in s["quantiles"].values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
