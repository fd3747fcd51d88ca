"""What each ``iltm`` subcommand does; :mod:`iltm.cli` only parses arguments and turns errors into exit codes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import config as config_mod
from .errors import InputError
from .progress import Reporter
from .run import RunFolder

SCORE_SUFFIX = "_score.nii.gz"
MASK_SUFFIX = "_mask.nii.gz"


# -- synth -----------------------------------------------------------------------------------------------------

def cmd_synth(args, reporter: Reporter) -> int:
    from .synth import make_cohort

    if args.n < 1:
        raise InputError("--n", "must be at least 1")
    if not 0.0 <= args.anomalous_fraction <= 1.0:
        raise InputError("--anomalous-fraction", "must lie in [0, 1]")
    manifest = make_cohort(args.out, dims=args.dims, n=args.n, anomalous_fraction=args.anomalous_fraction,
                           seed=args.seed, size=args.size, progress=reporter)
    n_anom = sum(1 for s in manifest["subjects"] if s["anomalous"]) if "subjects" in manifest else None
    reporter.log(f"wrote {args.n} {args.dims}D subjects ({n_anom} with lesions) to {args.out}")
    reporter.emit("done", out=str(args.out))
    return 0


# -- train -----------------------------------------------------------------------------------------------------

def cmd_train(args, reporter: Reporter) -> int:
    from .train import train

    if args.resume is not None:
        run = train(args.resume, resume=True, reporter=reporter)
    else:
        if args.out is None:
            raise InputError("--out", "required with --data (the run folder to create)")
        run = train(args.out, cfg=build_config(args), data=args.data, skip_unreadable=args.skip_unreadable,
                    reporter=reporter)
    reporter.log(f"run folder: {run.root}")
    return 0


# -- detect ----------------------------------------------------------------------------------------------------

def detection_overrides(cfg: config_mod.Config, args) -> config_mod.DetectionConfig:
    det = cfg.detection
    pairs = {"resampling_threshold": args.resampling_threshold, "samples": args.samples,
             "dropout_passes": args.dropout_passes, "eps": args.eps, "density_threshold": args.density_threshold}
    for name, value in pairs.items():
        if value is None:
            continue
        if value <= 0 or (name in ("samples", "dropout_passes") and value < 1):
            raise InputError(f"--{name.replace('_', '-')}", f"must be positive (got {value})")
        if name == "samples" and value < 2 and det.dropout_passes < 2:
            raise InputError("--samples", "the KDE needs at least 2 reconstructions (samples x dropout passes)")
        det = replace(det, **{name: value})
    if args.resampling_dilation is not None:
        if args.resampling_dilation < 0:
            raise InputError("--resampling-dilation", f"must be 0 or more tokens (got {args.resampling_dilation})")
        det = replace(det, resampling_dilation=args.resampling_dilation)
    return det


def cmd_detect(args, reporter: Reporter) -> int:
    from .detect import Detector
    from .io import list_images

    run = RunFolder(args.run)
    iteration = run.check_for_detection(args.iteration)
    cfg = run.config()
    detector = Detector.from_run(run, iteration, args.device, detection=detection_overrides(cfg, args))
    records = list_images(args.input)
    reporter.units_total = 1.0
    reporter.emit("start", command="detect", run=str(run.root), iteration=iteration, inputs=len(records))
    reporter.log(f"detecting with iteration {iteration} of {run.root} on {detector.device}")
    problems = detect_files(detector, records, args.out, reporter, seed=args.seed, png=not args.no_png)
    for line in problems:
        print(f"iltm: error: {line}", file=__import__("sys").stderr)
        reporter.emit("error", message=line)
    reporter.emit("done", out=str(args.out), failed=len(problems))
    return 2 if problems else 0


# -- evaluate --------------------------------------------------------------------------------------------------

def cmd_evaluate(args, reporter: Reporter) -> int:
    from .io import atomic_write_text

    ids, scores, labels = load_pairs(args.scores, args.labels)
    summary = summarise(scores, labels)
    summary["ids"] = ids
    out = args.out or args.scores / "metrics.json"
    atomic_write_text(Path(out), json.dumps(summary, indent=2, default=float) + "\n")
    print(format_table({str(args.scores): summary}))
    reporter.log(f"metrics written to {out}")
    reporter.emit("done", out=str(out), auroc=summary["auroc"], aupro=summary["aupro"], best_dice=summary["best_dice"])
    return 0


# -- report ----------------------------------------------------------------------------------------------------

def cmd_report(args, reporter: Reporter) -> int:
    run = RunFolder(args.run)
    if not run.root.is_dir():
        raise InputError(run.root, "run folder does not exist")
    paths = make_report(run, args.out or run.root / "report", args.scans)
    for p in paths:
        reporter.log(f"wrote {p}")
        reporter.emit("output", kind="figure", path=str(p))
    return 0


# -- demo ------------------------------------------------------------------------------------------------------

def cmd_demo(args, reporter: Reporter) -> int:
    from .demo import run_demo

    run_demo(args, reporter)
    return 0
