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
                           seed=args.seed, size=args.size, progress=reporter, dicom=args.dicom)
    n_anom = sum(1 for s in manifest["subjects"] if s["anomalous"]) if "subjects" in manifest else None
    reporter.log(f"wrote {args.n} {args.dims}D subjects ({n_anom} with lesions) to {args.out}"
                 + (f" (DICOM PET series in {args.out / 'dicom'})" if args.dicom else ""))
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

    full_fits = getattr(args, "full_fit", None) or []
    if args.resume is not None:
        if args.resume.is_dir():
            check_output_folder(args.resume, "--resume")
        run = train(args.resume, resume=True, reporter=reporter, full_fits=full_fits)
    else:
        if args.out is None:
            raise InputError("--out", "required with --data (the run folder to create)")
        check_output_folder(args.out)
        with removed_if_left_empty(args.out):
            run = train(args.out, cfg=train_config(args), data=args.data, skip_unreadable=args.skip_unreadable,
                        reporter=reporter, full_fits=full_fits)
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
    if getattr(args, "no_cuda_graphs", False):
        det = replace(det, cuda_graphs=False)
    return config_mod.validate(det, where="iltm detect", prefix="detection.")


def dicom_seg_sources(records) -> dict:
    """Record id -> its DICOM series' files in slice order, for ``--dicom-seg``; an input that is not a DICOM
    series folder is an InputError, raised before any detection starts."""
    from .io import dicom_series_files

    sources = {}
    for rec in records:
        if not rec.image.is_dir():
            raise InputError(rec.image, "--dicom-seg needs DICOM series as input (a series folder, or a folder of "
                                        "series folders); this is a file")
        sources[rec.id] = dicom_series_files(rec.image)
    return sources


def table_units(cfg: config_mod.Config, records) -> str:
    """The unit of the PET values ``detect --lesions`` tabulates: SUV when the run converts DICOM to SUV or the
    inputs are not DICOM (taken as SUV already), else the Units tag of the first DICOM series (e.g. BQML)."""
    from .io import dicom_series_files

    series = [rec.image for rec in records if rec.image.is_dir()]
    if cfg.data.units == "suv" or not series:
        return "SUV"
    import pydicom

    return str(pydicom.dcmread(str(dicom_series_files(series[0])[0]), stop_before_pixels=True).get("Units", "")
               or "stored units")


def cmd_detect(args, reporter: Reporter) -> int:
    from . import distributed
    from .bundle import open_model
    from .detect import Detector, detect_files, detection_settings, record_settings, resolve_device
    from .io import check_output_folder, list_images, removed_if_left_empty

    if args.split_lesions and not args.dicom_seg:
        raise InputError("--split-lesions", "only applies with --dicom-seg")
    check_output_folder(args.out)
    run = open_model(args.run)
    iteration = run.check_for_detection(args.iteration)
    records = list_images(args.input)
    sources = dicom_seg_sources(records) if args.dicom_seg else None  # refused before any model is loaded
    cfg = run.config()
    device = distributed.init_from_env(resolve_device(args.device))  # under torchrun: this rank's device
    detector = Detector.from_run(run, iteration, str(device), detection=detection_overrides(cfg, args))
    reporter.units_total = 1.0
    reporter.emit("start", command="detect", run=str(run.root), iteration=iteration, inputs=len(records))
    processes = f" ({distributed.world_size()} processes)" if distributed.world_size() > 1 else ""
    reporter.log(f"detecting with iteration {iteration} of {run.root} on {detector.device}{processes}")
    unit = args.units or table_units(cfg, records)
    with removed_if_left_empty(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        record = record_settings(args.out, detection_settings(str(run.root), iteration, detector.cfg.detection,
                                                              args.seed, unit),
                                 resume=args.resume, write=distributed.is_main())
        try:
            problems = detect_files(detector, records, args.out, reporter, seed=args.seed, png=not args.no_png,
                                    lesions=args.lesions, dicom_seg_sources=sources,
                                    split_lesions=args.split_lesions, unit=unit, resume=args.resume)
        finally:  # no map written: no record of what would have made them
            if distributed.is_main() and [f.name for f in args.out.iterdir()] == [record.name]:
                record.unlink()
    if not distributed.is_main():  # rank 0 reports every rank's problems; a failing rank would get the others killed
        return 0
    for line in problems:
        print(f"iltm: error: {line}", file=sys.stderr)
        reporter.emit("error", message=line)
    reporter.emit("done", out=str(args.out), failed=len(problems))
    return 2 if problems else 0


# -- export ----------------------------------------------------------------------------------------------------

def cmd_export(args, reporter: Reporter) -> int:
    from .bundle import export_bundle
    from .io import check_output_file, removed_if_left_empty

    check_output_file(args.out)
    with removed_if_left_empty(args.out.parent):
        metadata = export_bundle(args.run, args.out, args.iteration, units=args.units)
    reporter.log(f"wrote {args.out}: iteration {metadata['iteration']}, trained on {metadata['training']['scans']} "
                 f"scans ({metadata['training']['iterations']} ILTM iterations)")
    reporter.emit("done", out=str(args.out), iteration=metadata["iteration"])
    return 0


# -- lesions ---------------------------------------------------------------------------------------------------

def cmd_lesions(args, reporter: Reporter) -> int:
    from . import lesions
    from .io import atomic_write_text, check_output_file, read_image, read_label, removed_if_left_empty

    check_output_file(args.out)
    pet = read_image(args.pet)
    mask = read_label(args.mask)
    score = read_image(args.score) if args.score is not None else None
    found, totals = lesions.lesions_of_images(pet, mask, score, mask_name=str(args.mask),
                                              score_name=str(args.score))
    with removed_if_left_empty(args.out.parent):
        atomic_write_text(args.out, lesions.csv_text(*lesions.lesion_rows(found, args.units, score is not None)))
    line = (f"{totals.lesion_count} lesions, metabolic tumour volume {totals.mtv_ml:.3g} mL, "
            f"total TLG {totals.total_tlg:.4g} {args.units}*mL")
    if totals.scan_score is not None:
        line += f", scan score (max) {totals.scan_score:.4g}"
    print(line)
    reporter.log(f"wrote {args.out}")
    reporter.emit("done", out=str(args.out), lesions=totals.lesion_count, mtv_ml=totals.mtv_ml,
                  total_tlg=totals.total_tlg, scan_score=totals.scan_score)
    return 0


# -- evaluate --------------------------------------------------------------------------------------------------

def cmd_evaluate(args, reporter: Reporter) -> int:
    from .evaluate import LESION_KEYS, format_table, lesion_summary, load_cohort, summarise
    from .io import atomic_write_text, check_output_file, removed_if_left_empty

    out = check_output_file(args.out or args.scores / "metrics.json")
    cohort = load_cohort(args.scores, args.labels)
    summary = summarise(cohort.scores, cohort.labels)
    summary["ids"] = cohort.ids
    if cohort.masks is None:
        reporter.warn(f"{args.scores}: no *_mask.nii.gz beside the score maps, so no lesion-level metrics "
                      f"({', '.join(LESION_KEYS)}); run iltm detect into that folder to get them")
    else:
        lesion = lesion_summary(cohort.masks, cohort.labels, cohort.voxel_ml)
        summary.update({k: lesion[k] for k in LESION_KEYS})
        if summary["lesion_sensitivity"] is None:
            summary["undefined"]["lesion_sensitivity"] = "the labels mark no lesion"
        for entry, scan in zip(summary["per_image"], lesion["per_scan"]):
            entry.update(scan)
    with removed_if_left_empty(Path(out).parent):
        atomic_write_text(Path(out), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(format_table({str(args.scores): summary}))
    reporter.log(f"metrics written to {out}")
    reporter.emit("done", out=str(out), **{k: summary[k] for k in ("auroc", "aupro", "best_dice",
                                                                     "average_precision", "scan_auroc")})
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
    choice = detection_choice(run.history())
    if choice and reporter.mode == "jsonl":
        reporter.emit("selection", message=choice)
    elif choice:
        print(choice)
    for p in paths:
        reporter.log(f"wrote {p}")
        reporter.emit("output", kind="figure", path=str(p))
    return 0


def detection_choice(history: dict) -> str | None:
    """Which iteration ``iltm detect`` uses by default and why, from ``history.json`` (None for runs from before
    training recorded it)."""
    used, best = history.get("detection_iteration"), history.get("best_iteration")
    if used is None:
        return None
    reason = history.get("selection_reason") or ""
    if used == best:
        return f"detection uses iteration {used}: {reason}"
    return (f"detection uses iteration {used} (iltm.select_iteration=last); the label-free choice would be "
            f"iteration {best}: {reason}")


# -- suv -------------------------------------------------------------------------------------------------------

def cmd_suv(args, reporter: Reporter) -> int:
    from .io import check_output_file, removed_if_left_empty, write_image
    from .suv import read_suv

    if not args.out.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise InputError(args.out, "give an image file name (.nii.gz, .nii, .nrrd or .mha)")
    check_output_file(args.out)
    image, factors = read_suv(args.series, weight_kg=args.weight, dose_mbq=args.dose,
                              injection_time=args.injection_time, half_life_s=args.half_life)
    with removed_if_left_empty(args.out.parent):
        write_image(image, args.out)
    for line in factors.describe():
        print(line)
    print(f"wrote {args.out} (SUV, {'x'.join(map(str, image.GetSize()))} voxels)")
    reporter.emit("output", kind="suv", path=str(args.out), factor=float(factors.factors.mean()))
    reporter.emit("done", out=str(args.out))
    return 0


# -- demo ------------------------------------------------------------------------------------------------------

def cmd_demo(args, reporter: Reporter) -> int:
    from .demo import run_demo
    from .io import check_output_folder

    check_output_folder(args.out)

    run_demo(args.out, reporter, dims=args.dims, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
             preset=args.preset, max_iterations=args.max_iterations, overrides=args.set)
    return 0
