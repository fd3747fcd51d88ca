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

def build_config(args) -> config_mod.Config:
    cfg = config_mod.load(args.config) if getattr(args, "config", None) else config_mod.preset(args.preset)
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "max_iterations", None) is not None:
        cfg.iltm.max_iterations = args.max_iterations
    if getattr(args, "constant_threshold", False):
        cfg.iltm.constant_threshold = True
    if getattr(args, "device", None):
        cfg.device = args.device
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise InputError("--set", f"'{item}' is not SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        config_mod.set_dotted(cfg, key.strip(), value)
    return cfg


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


def detect_files(detector, records, out: Path, reporter: Reporter, seed: int = 0, png: bool = True) -> list[str]:
    """Detect every record into ``out``; returns the problems (one line each) of the inputs that failed."""
    from .io import read_image, write_image
    from .visualize import save_overlay_png

    problems = []
    for rec in reporter.track(records, "detect", units=1.0):
        try:
            img = read_image(rec.image)
            generator = torch.Generator(device=detector.device).manual_seed(seed)
            score, mask, result = detector.detect_image(img, generator=generator, where=str(rec.image))
        except InputError as exc:
            problems.append(str(exc))
            continue
        score_path, mask_path = out / f"{rec.id}{SCORE_SUFFIX}", out / f"{rec.id}{MASK_SUFFIX}"
        write_image(score, score_path)
        write_image(mask, mask_path)
        reporter.emit("output", kind="score", path=str(score_path), id=rec.id)
        reporter.emit("output", kind="mask", path=str(mask_path), id=rec.id)
        flagged = int(result.flagged.sum())
        line = (f"{rec.id}: {flagged}/{result.flagged.numel()} tokens resampled, "
                f"{int(sitk.GetArrayViewFromImage(mask).sum())} anomalous voxels, {result.seconds:.1f} s")
        if png and img.GetDimension() == 2:
            png_path = out / f"{rec.id}_overlay.png"
            save_overlay_png(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(score),
                             sitk.GetArrayFromImage(mask), png_path, title=rec.id)
            reporter.emit("output", kind="overlay", path=str(png_path), id=rec.id)
        reporter.log(line)
    return problems


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

def _find_label(labels: Path, scan_id: str) -> Path:
    for candidate in sorted(labels.glob(f"{scan_id}.*")):
        return candidate
    raise InputError(labels, f"no label file for '{scan_id}' (expected {scan_id}.nii.gz)")


def load_pairs(scores: Path, labels: Path, suffix: str = SCORE_SUFFIX) -> tuple[list[str], list, list]:
    from .io import read_image

    if not scores.is_dir():
        raise InputError(scores, "scores folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist")
    paths = sorted(scores.glob(f"*{suffix}"))
    if not paths:
        raise InputError(scores, f"no *{suffix} files")
    ids, score_arrays, label_arrays = [], [], []
    for path in paths:
        scan_id = path.name[: -len(suffix)]
        label_path = _find_label(labels, scan_id)
        s = sitk.GetArrayFromImage(read_image(path))
        lab = sitk.GetArrayFromImage(read_image(label_path)) > 0.5
        if s.shape != lab.shape:
            raise InputError(label_path, f"shape {lab.shape} does not match the score map {path.name} {s.shape}")
        ids.append(scan_id)
        score_arrays.append(s)
        label_arrays.append(lab)
    return ids, score_arrays, label_arrays


def summarise(scores: list, labels: list) -> dict[str, Any]:
    """Pooled voxel metrics over the set plus mean/std over images (images without lesions skip AUPRO/Dice)."""
    from . import metrics

    result = metrics.evaluate(scores, labels)
    summary = {k: result[k] for k in ("auroc", "aupro", "best_dice", "best_threshold")}
    for key in ("auroc", "aupro", "best_dice"):
        values = np.array([p[key] for p in result["per_image"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"{key}_std"] = float(values.std()) if values.size else float("nan")
    summary["per_image"] = result["per_image"]
    return summary


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'method':<28} {'AUROC':>14} {'AUPRO':>14} {'best Dice':>14}"]
    for name, m in rows.items():
        cells = [f"{100 * m[k]:6.1f} ± {100 * m[k + '_std']:4.1f}" for k in ("auroc", "aupro", "best_dice")]
        lines.append(f"{name:<28} " + " ".join(f"{c:>14}" for c in cells))
    lines.append("(pooled voxel metrics in %, ± standard deviation over test images)")
    return "\n".join(lines)


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

def make_report(run: RunFolder, out: Path, scans: int = 6) -> list[Path]:
    from .io import read_image
    from .visualize import history_figure, overlay_axes, save_figure
    import matplotlib.pyplot as plt

    history = run.history()
    if not history["iterations"]:
        raise InputError(run.root, "run has no finished ILTM iteration to report")
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / "history.png"
    history_figure(history, history_path)
    iterations = [r["iteration"] for r in history["iterations"]]
    images = run.manifest()["images"][:scans]
    fig, axes = plt.subplots(len(images), len(iterations) + 1, squeeze=False,
                             figsize=(2.2 * (len(iterations) + 1), 2.2 * len(images)))
    for r, item in enumerate(images):
        image = sitk.GetArrayFromImage(read_image(item["image"]))
        overlay_axes(axes[r, 0], image)
        axes[r, 0].set_title(item["id"], fontsize=8)
        for c, k in enumerate(iterations, start=1):
            mask = sitk.GetArrayFromImage(read_image(run.mask_path(k, item["id"]))) > 0
            overlay_axes(axes[r, c], image, mask=mask)
            if r == 0:
                axes[r, c].set_title(f"iteration {k} mask", fontsize=8)
    montage_path = out / "masks.png"
    save_figure(fig, montage_path)
    return [history_path, montage_path]


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
