"""What each ``iltm`` subcommand does; :mod:`iltm.cli` only parses arguments and turns errors into exit codes."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from . import config as config_mod
from .errors import InputError
from .progress import Reporter
from .run import RunFolder


# -- synth -----------------------------------------------------------------------------------------------------

def cmd_synth(args, reporter: Reporter) -> int:
    from .synth import make_cohort

    if args.n < 1:
        raise InputError("--n", "must be at least 1")
    if not 0.0 <= args.anomalous_fraction <= 1.0:
        raise InputError("--anomalous-fraction", "must lie in [0, 1]")
    from .io import check_output_folder

    check_output_folder(args.out)
    manifest = make_cohort(args.out, dims=args.dims, n=args.n, anomalous_fraction=args.anomalous_fraction,
                           seed=args.seed, size=args.size, progress=reporter)
    n_anom = sum(1 for s in manifest["subjects"] if s["anomalous"]) if "subjects" in manifest else None
    reporter.log(f"wrote {args.n} {args.dims}D subjects ({n_anom} with lesions) to {args.out}")
    reporter.emit("done", out=str(args.out))
    return 0


# -- train -----------------------------------------------------------------------------------------------------

def train_config(args) -> config_mod.Config:
    """The config ``iltm train`` and ``iltm demo`` run with: a preset or ``--config``, the flags, ``--set``."""
    return config_mod.build(getattr(args, "preset", "tiny"), getattr(args, "config", None),
                            getattr(args, "set", None) or [], seed=getattr(args, "seed", None),
                            device=getattr(args, "device", None),
                            iltm__max_iterations=getattr(args, "max_iterations", None),
                            iltm__constant_threshold=True if getattr(args, "constant_threshold", False) else None)


def cmd_train(args, reporter: Reporter) -> int:
    from .io import check_output_folder, removed_if_left_empty
    from .train import train

    if args.resume is not None:
        if args.resume.is_dir():
            check_output_folder(args.resume, "--resume")
        run = train(args.resume, resume=True, reporter=reporter)
    else:
        if args.out is None:
            raise InputError("--out", "required with --data (the run folder to create)")
        check_output_folder(args.out)
        with removed_if_left_empty(args.out):
            run = train(args.out, cfg=train_config(args), data=args.data, skip_unreadable=args.skip_unreadable,
                        reporter=reporter)
    reporter.log(f"run folder: {run.root}")
    return 0


# -- detect ----------------------------------------------------------------------------------------------------

DETECTION_FLAGS = ("resampling_threshold", "samples", "dropout_passes", "eps", "density_threshold")


def detection_overrides(cfg: config_mod.Config, args) -> config_mod.DetectionConfig:
    """The run's detection settings with the flags that were given; each flag is checked like ``--set``."""
    det = cfg.detection
    for name in DETECTION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            det = replace(det, **{name: value})
    return config_mod.validate(det, where="iltm detect", prefix="detection.")


def cmd_detect(args, reporter: Reporter) -> int:
    from .detect import Detector, detect_files
    from .io import check_output_folder, list_images, removed_if_left_empty

    check_output_folder(args.out)
    run = RunFolder(args.run)
    iteration = run.check_for_detection(args.iteration)
    cfg = run.config()
    detector = Detector.from_run(run, iteration, args.device, detection=detection_overrides(cfg, args))
    records = list_images(args.input)
    reporter.units_total = 1.0
    reporter.emit("start", command="detect", run=str(run.root), iteration=iteration, inputs=len(records))
    reporter.log(f"detecting with iteration {iteration} of {run.root} on {detector.device}")
    with removed_if_left_empty(args.out):
        problems = detect_files(detector, records, args.out, reporter, seed=args.seed, png=not args.no_png)
    for line in problems:
        print(f"iltm: error: {line}", file=sys.stderr)
        reporter.emit("error", message=line)
    reporter.emit("done", out=str(args.out), failed=len(problems))
    return 2 if problems else 0


# -- evaluate --------------------------------------------------------------------------------------------------

def cmd_evaluate(args, reporter: Reporter) -> int:
    from .evaluate import format_table, load_pairs, summarise
    from .io import atomic_write_text, check_output_file, removed_if_left_empty

    out = check_output_file(args.out or args.scores / "metrics.json")
    ids, scores, labels = load_pairs(args.scores, args.labels)
    summary = summarise(scores, labels)
    summary["ids"] = ids
    with removed_if_left_empty(Path(out).parent):
        atomic_write_text(Path(out), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(format_table({str(args.scores): summary}))
    reporter.log(f"metrics written to {out}")
    reporter.emit("done", out=str(out), auroc=summary["auroc"], aupro=summary["aupro"], best_dice=summary["best_dice"])
    return 0


# -- report ----------------------------------------------------------------------------------------------------

def cmd_report(args, reporter: Reporter) -> int:
    from .io import check_output_folder
    from .report import make_report

    run = RunFolder(args.run)
    if not run.root.is_dir():
        raise InputError(run.root, "run folder does not exist")
    if args.scans < 1:
        raise InputError("--scans", f"must be at least 1 (got {args.scans})")
    out = check_output_folder(args.out or run.root / "report")
    paths = make_report(run, out, args.scans)
    for p in paths:
        reporter.log(f"wrote {p}")
        reporter.emit("output", kind="figure", path=str(p))
    return 0


# -- demo ------------------------------------------------------------------------------------------------------

def cmd_demo(args, reporter: Reporter) -> int:
    from .demo import run_demo
    from .io import check_output_folder

    check_output_folder(args.out)

    run_demo(args.out, reporter, dims=args.dims, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
             preset=args.preset, max_iterations=args.max_iterations, overrides=args.set)
    return 0
