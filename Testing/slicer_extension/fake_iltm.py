"""A stand-in for the ``iltm`` command line that speaks its protocol, for testing the panel's job handling fast.

It takes the same arguments as ``iltm detect`` / ``iltm train`` and writes the same files, but computes nothing
(``--run`` may be a model bundle, whose zip and metadata it checks as the core does):
``detect`` writes the input's intensity as the "score" (so hot spots are anomalous) and ``score > -ln(tau)`` as
the mask, on the input's geometry; ``train`` writes a run folder with the contract's layout.

Behaviour switches (environment):
    FAKE_ILTM_FAIL=1      fail like the real CLI: one ``iltm: error: ...`` line on stderr, exit code 2
    FAKE_ILTM_SLEEP=S     sleep S seconds per progress step (to test Cancel)
    FAKE_ILTM_CRASH=1     die with a Python traceback and exit code 1 (no error line)
    FAKE_ILTM_STEPS=N     number of progress steps (default 5)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ILTMAnomaly"))
from iltm.errors import InputError  # noqa: E402
from iltm.layout import (DEFAULT_DENSITY_THRESHOLD, FORMAT_VERSION, MASK_SUFFIX, SCORE_SUFFIX,  # noqa: E402
                         RunLayout, empty_history, is_bundle, read_bundle_metadata)


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def steps(stage: str, base: float, share: float) -> None:
    count = int(os.environ.get("FAKE_ILTM_STEPS", "5"))
    pause = float(os.environ.get("FAKE_ILTM_SLEEP", "0"))
    for done in range(1, count + 1):
        if pause:
            time.sleep(pause)
        # A tqdm-like line on stderr and a stray print on stdout: the reader must tolerate both.
        sys.stderr.write(f"\r{stage}: {100 * done // count}%|####| {done}/{count}\n")
        if done == 1:
            print(f"note: {stage} started")
        emit("progress", stage=stage, done=done, total=count, fraction=base + share * done / count)


def fail(where: str, problem: str) -> None:
    emit("error", message=f"{where}: {problem}")
    sys.stderr.write(f"iltm: error: {where}: {problem}\n")
    sys.exit(2)


def stem_of(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def detect(args) -> None:
    import SimpleITK as sitk

    emit("start", command="detect", run=str(args.run), iteration=args.iteration)
    if is_bundle(args.run):
        try:
            read_bundle_metadata(args.run, verify=True)
        except InputError as error:
            fail(error.where, error.problem)
    elif not RunLayout(args.run).config_path.is_file():
        fail(str(args.run), "run folder is missing config.yaml (was training finished?)")
    if os.environ.get("FAKE_ILTM_FAIL"):
        fail(str(args.input), "image is too small for the VQ-VAE (needs at least 8 voxels per axis)")
    if os.environ.get("FAKE_ILTM_CRASH"):
        raise RuntimeError("simulated crash")
    image = sitk.ReadImage(str(args.input))
    steps("detect", 0.0, 1.0)
    tau = args.density_threshold or DEFAULT_DENSITY_THRESHOLD
    score = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.Cast(score > -math.log(tau), sitk.sitkUInt8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem_of(Path(args.input))
    for kind, suffix, result in (("score", SCORE_SUFFIX, score), ("mask", MASK_SUFFIX, mask)):
        path = out / f"{stem}{suffix}"
        sitk.WriteImage(result, str(path))
        emit("output", kind=kind, path=str(path), id=stem)
    emit("log", message=f"{stem}: {int(sitk.GetArrayViewFromImage(mask).sum())} anomalous voxels")
    emit("done", out=str(out))


def train(args) -> None:
    import SimpleITK as sitk

    if args.resume:
        run = RunLayout(args.resume)
        if not run.config_path.is_file():
            fail(str(run.root), "cannot resume: not a run folder (config.yaml or manifest.json missing)")
        data = Path(run.manifest()["images"][0]["image"]).parent
        max_iterations = 2
    else:
        run, data, max_iterations = RunLayout(args.out), Path(args.data), args.max_iterations or 2
    emit("start", command="train", run=str(run.root), iterations=max_iterations + 1)
    if os.environ.get("FAKE_ILTM_FAIL"):
        fail(str(data), "no readable images in this folder")
    images = sorted(data.glob("*.nii.gz"))
    scans = [{"id": stem_of(p), "image": str(p.resolve())} for p in images]
    dims = sitk.ReadImage(str(images[0])).GetDimension() if images else 3
    run.root.mkdir(parents=True, exist_ok=True)
    run.config_path.write_text(f"preset: {args.preset}\ndata:\n  spatial_dims: {dims}\n")
    run.manifest_path.write_text(json.dumps({"version": FORMAT_VERSION, "spatial_dims": dims, "images": scans}))
    steps("vqvae", 0.0, 0.2)
    run.vqvae_path.write_bytes(b"fake")
    history = empty_history()
    previous = None
    for k in range(max_iterations + 1):
        steps(f"transformer {k}", 0.2 + 0.8 * k / (max_iterations + 1), 0.8 / (max_iterations + 1))
        (run.iteration_dir(k) / "masks").mkdir(parents=True, exist_ok=True)
        run.transformer_path(k).write_bytes(b"fake")
        count = 0
        for scan in scans:
            image = sitk.ReadImage(scan["image"])
            mask = sitk.Cast(image > (4.0 + k), sitk.sitkUInt8)
            count += int(sitk.GetArrayViewFromImage(mask).sum())
            sitk.WriteImage(mask, str(run.mask_path(k, scan["id"])))
        threshold = 0.005 * 0.875 ** k  # the paper preset's resampling threshold
        change = None if previous is None else abs(count - previous) / max(previous, 1)
        record = {"iteration": k, "resampling_threshold": threshold, "masked_tokens": count,
                  "masked_change": change, "transformer_loss": 1.0 / (k + 1), "train_seconds": 0.1,
                  "detect_seconds": 0.1}
        history["iterations"].append(record)
        emit("iteration", **record)
        run.history_path.write_text(json.dumps(history))
        previous = count
    history.update(finished=True, stop_reason=f"reached --max-iterations ({max_iterations})")
    run.history_path.write_text(json.dumps(history))
    emit("done", run=str(run.root))


def main() -> None:
    parser = argparse.ArgumentParser(prog="iltm")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("detect")
    d.add_argument("--run", required=True)
    d.add_argument("--input", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--iteration", type=int)
    d.add_argument("--device", default="auto")
    d.add_argument("--resampling-threshold", type=float)
    d.add_argument("--samples", type=int)
    d.add_argument("--dropout-passes", type=int)
    d.add_argument("--eps", type=float)
    d.add_argument("--density-threshold", type=float)
    d.add_argument("--seed", type=int)
    d.add_argument("--progress", default="bar")
    t = sub.add_parser("train")
    t.add_argument("--data")
    t.add_argument("--resume")
    t.add_argument("--out")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--max-iterations", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--progress", default="bar")
    args = parser.parse_args()
    detect(args) if args.command == "detect" else train(args)


if __name__ == "__main__":
    main()
