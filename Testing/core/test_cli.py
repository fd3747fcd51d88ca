"""End to end through the real ``iltm`` CLI on CPU: synth -> train -> detect -> evaluate -> report, resume, bad input.

Models are the tiny preset cut down further with ``--set`` so that the whole file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from cli_helpers import FAST, cli_subprocess, run_cli


def test_train_writes_a_complete_run_folder(run2d, cohort2d):
    history = json.loads((run2d / "history.json").read_text(encoding="utf-8"))
    assert history["finished"] and history["stop_reason"]
    iterations = [r["iteration"] for r in history["iterations"]]
    assert iterations[0] == 0 and iterations == list(range(len(iterations)))
    t0 = yaml.safe_load((run2d / "config.yaml").read_text(encoding="utf-8"))["detection"]["resampling_threshold"]
    first = history["iterations"][0]
    assert first["masked_change"] is None and math.isclose(first["resampling_threshold"], t0)
    if len(iterations) > 1:
        assert math.isclose(history["iterations"][1]["resampling_threshold"], t0 * 0.875)
    for rec in history["iterations"]:
        for key in ("masked_tokens", "transformer_loss", "train_seconds", "detect_seconds"):
            assert key in rec
    images = sorted((cohort2d / "images").glob("*.nii.gz"))
    for k in iterations:
        assert (run2d / f"iteration_{k:03d}" / "transformer.pt").is_file()
        masks = sorted((run2d / f"iteration_{k:03d}" / "masks").glob("*_mask.nii.gz"))
        assert len(masks) == len(images)
        # Image-space masks keep each training scan's geometry.
        scan = sitk.ReadImage(str(images[0]))
        mask = sitk.ReadImage(str(run2d / f"iteration_{k:03d}" / "masks" / f"{images[0].name[:-7]}_mask.nii.gz"))
        assert mask.GetSize() == scan.GetSize() and mask.GetSpacing() == scan.GetSpacing()
        assert mask.GetPixelID() == sitk.sitkUInt8
    cfg = (run2d / "config.yaml").read_text(encoding="utf-8")
    assert "spatial_dims: 2" in cfg and "preset: tiny" in cfg
    assert not list(run2d.rglob("*.tmp*")), "temporary files left behind"


def test_detect_outputs_match_input_geometry_and_threshold(run2d, cohort2d, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    out = tmp_path / "det"
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", out, "--density-threshold", "0.01") == 0
    stem = image.name[:-7]
    score = sitk.ReadImage(str(out / f"{stem}_score.nii.gz"))
    mask = sitk.ReadImage(str(out / f"{stem}_mask.nii.gz"))
    src = sitk.ReadImage(str(image))
    for img in (score, mask):
        assert img.GetSize() == src.GetSize()
        assert np.allclose(img.GetSpacing(), src.GetSpacing()) and np.allclose(img.GetOrigin(), src.GetOrigin())
        assert np.allclose(img.GetDirection(), src.GetDirection())
    assert score.GetPixelID() == sitk.sitkFloat32 and mask.GetPixelID() == sitk.sitkUInt8
    s, m = sitk.GetArrayFromImage(score), sitk.GetArrayFromImage(mask)
    assert np.isfinite(s).all()
    assert np.array_equal(m, (s > -math.log(0.01)).astype(np.uint8))
    assert (out / f"{stem}_overlay.png").is_file()


def test_detect_records_whether_healing_may_use_cuda_graphs(run2d, cohort2d, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    records = {}
    for flags in ([], ["--no-cuda-graphs"]):
        out = tmp_path / f"det{len(flags)}"
        assert run_cli("detect", "--run", run2d, "--input", image, "--out", out, "--no-png", *flags) == 0
        records[tuple(flags)] = json.loads((out / "detect.json").read_text())
    assert records[()]["detection.cuda_graphs"] is True
    assert records[("--no-cuda-graphs",)]["detection.cuda_graphs"] is False
    # On a CPU both heal eagerly: the same maps.
    maps = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{image.name[:-7]}_score.nii.gz")))
            for d in ("det0", "det1")]
    assert np.array_equal(*maps)


def test_detect_iteration_choice_and_folder_input(run2d, cohort2d, tmp_path):
    out = tmp_path / "det0"
    assert run_cli("detect", "--run", run2d, "--input", cohort2d / "images", "--out", out, "--iteration", "0",
                   "--no-png") == 0
    assert len(list(out.glob("*_score.nii.gz"))) == len(list((cohort2d / "images").glob("*.nii.gz")))
    assert not list(out.glob("*.png"))


def test_detect_progress_jsonl_protocol(run2d, cohort2d, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    proc = cli_subprocess("detect", "--run", run2d, "--input", image, "--out", tmp_path, "--progress", "jsonl")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds
    outputs = {e["kind"]: e["path"] for e in events if e["event"] == "output"}
    assert Path(outputs["score"]).is_file() and Path(outputs["mask"]).is_file()
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions[-1] == pytest.approx(1.0)


def test_evaluate_and_report(run2d, cohort2d, tmp_path, capsys):
    out = tmp_path / "scores"
    assert run_cli("detect", "--run", run2d, "--input", cohort2d / "images", "--out", out, "--no-png") == 0
    assert run_cli("evaluate", "--scores", out, "--labels", cohort2d / "labels") == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "AUPRO" in printed
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["auroc"] <= 1.0 and 0.0 <= metrics["best_dice"] <= 1.0
    assert len(metrics["per_image"]) == len(metrics["ids"]) == 8
    capsys.readouterr()
    assert run_cli("report", run2d, "--out", tmp_path / "report") == 0
    history = json.loads((run2d / "history.json").read_text(encoding="utf-8"))
    said = capsys.readouterr()
    # run2d asks for the last iteration: the report says so, and what the label-free rule would have kept
    expected = (f"detection uses iteration 1: {history['selection_reason']}" if history["best_iteration"] == 1 else
                "detection uses iteration 1 (iltm.select_iteration=last); the label-free choice would be iteration 0")
    assert expected in said.out
    # A program reading --progress jsonl gets the same line as an event, and stdout stays JSON lines only.
    from iltm.cli import main
    assert main(["report", str(run2d), "--out", str(tmp_path / "report2"), "--progress", "jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    selection = [e["message"] for e in events if e["event"] == "selection"]
    assert len(selection) == 1 and selection[0].startswith(expected) and selection[0] in said.out
    for name in ("history.png", "masks.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    # A reader that has gone (| head) gets no traceback: the table goes to a pipe nobody reads any more.
    reader = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    reader.wait(timeout=60)
    proc = subprocess.run([sys.executable, "-m", "iltm", "evaluate", "--scores", str(out), "--labels",
                           str(cohort2d / "labels"), "--progress", "none"], stdout=reader.stdin,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    reader.stdin.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Broken" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_end_to_end_small_3d(tmp_path):
    cohort, run = tmp_path / "c3", tmp_path / "r3"
    assert run_cli("synth", "--out", cohort, "--dims", "3", "--n", "4", "--anomalous-fraction", "1", "--seed", "1",
                   "--size", "32", "32", "32") == 0
    assert run_cli("train", "--data", cohort, "--out", run, "--preset", "tiny", "--max-iterations", "1",
                   *FAST) == 0
    assert "spatial_dims: 3" in (run / "config.yaml").read_text(encoding="utf-8")
    out = tmp_path / "d3"
    assert run_cli("detect", "--run", run, "--input", cohort / "images", "--out", out) == 0
    src = sitk.ReadImage(str(sorted((cohort / "images").glob("*.nii.gz"))[0]))
    score = sitk.ReadImage(str(sorted(out.glob("*_score.nii.gz"))[0]))
    assert score.GetDimension() == 3 and score.GetSize() == src.GetSize()
    assert run_cli("evaluate", "--scores", out, "--labels", cohort / "labels") == 0


def test_resume_after_an_interrupted_iteration(cohort2d, tmp_path):
    """Kill training while iteration 1 detects on the training scans, then resume: nothing finished is redone."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "iltm", "train", "--data", str(cohort2d), "--out", str(run), "--preset", "tiny",
           "--max-iterations", "2", "--set", "iltm.stop_change=0", "--progress", "jsonl", *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = False
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if time.monotonic() > deadline:
            break
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == "progress" and event.get("iteration") == 1 and "detect" in event["stage"] \
                    and event["done"] >= 2:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    proc.wait(timeout=60)
    assert killed, "training finished before it could be interrupted"
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [r["iteration"] for r in history["iterations"]] == [0] and not history["finished"]
    # tiny fits the full-cohort Transformer of the last iteration only, after the loop: the fold ones are kept
    kept = {p: p.stat().st_mtime_ns for p in [run / "vqvae.pt", *sorted((run / "iteration_000" / "folds").glob("*.pt")),
                                              *sorted((run / "iteration_001" / "folds").glob("*.pt")),
                                              *sorted((run / "iteration_001" / "masks").glob("*.nii.gz"))]}
    assert len(kept) >= 7
    assert run_cli("train", "--resume", run) == 0
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert history["finished"] and [r["iteration"] for r in history["iterations"]] == [0, 1, 2]
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert len(list((run / "iteration_001" / "masks").glob("*.nii.gz"))) == 8


def test_help_has_examples():
    for command in ("synth", "train", "detect", "evaluate", "report", "demo"):
        proc = cli_subprocess(command, "--help")
        assert proc.returncode == 0 and "example" in proc.stdout, command


def test_demo_runs_to_the_end_and_reports_all_methods(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--out", out, "--n-train", "6", "--n-test", "4", "--max-iterations", "1", *FAST) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # the iteration training chose for detection, and beside it iteration 0, or the last one where 0 was kept
    used = results["history"]["detection_iteration"]
    other = "VQ-VAE+Transformer (it. 0)" if used else "ILTM, last iteration (1), not kept"
    for name in (f"ILTM (iteration {used})", other, "intensity threshold", "results (JSON)"):
        assert name in printed
    assert set(results["metrics"]) == {f"ILTM (iteration {used})", other, "intensity threshold"}
    for metrics in results["metrics"].values():
        assert 0.0 <= metrics["auroc"] <= 1.0
    assert "clip_value: 15.0" in (out / "run" / "config.yaml").read_text(encoding="utf-8")
    for figure in results["figures"]:
        assert Path(figure).stat().st_size > 1000
    assert run_cli("demo", "--out", out) == 2  # refuses to overwrite a finished demo


def test_the_demo_detects_with_the_iteration_training_chose(tmp_path, capsys, monkeypatch):
    """With iltm.select_iteration=best the full-cohort Transformer exists for the kept iteration, not the last one:
    the demo detects with the one training chose, and scores the last one beside it to show what the choice did."""
    from iltm import train as train_mod

    def keep_iteration_0(run, cfg, tokens, scan_ids, device, cache=None):
        return {"per_iteration": [], "reference_tokens": 1, "probabilities": "held-out",
                "best_iteration": 0, "selection_reason": "kept for the test"}

    monkeypatch.setattr(train_mod, "select_iteration", keep_iteration_0)
    out = tmp_path / "demo"
    assert run_cli("demo", "--out", out, "--n-train", "6", "--n-test", "4", "--max-iterations", "1",
                   "--set", "iltm.select_iteration=best", "--set", "iltm.stop_change=0", *FAST) == 0
    printed = capsys.readouterr().out
    assert "detection uses iteration 0 (kept for the test)" in printed
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(results["metrics"]) == {"ILTM (iteration 0)", "ILTM, last iteration (1), not kept",
                                       "intensity threshold"}
    assert [r["iteration"] for r in results["history"]["iterations"]] == [0, 1]
    assert (out / "scores" / "last_iteration").is_dir() and (out / "run" / "iteration_001" / "transformer.pt").is_file()


def test_detect_on_a_rotated_anisotropic_input_keeps_its_geometry(run2d, tmp_path):
    """The model grid is 64 x 64 isotropic; a rotated, anisotropic, odd-sized scan must come back on its own grid."""
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray((rng.random((71, 53)) * 4).astype(np.float32))  # (y, x) = 71 x 53 voxels
    img.SetSpacing((1.5, 2.75))
    img.SetOrigin((-40.0, 12.5))
    angle = np.deg2rad(20)
    img.SetDirection((np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)))
    path = tmp_path / "rotated.nrrd"
    sitk.WriteImage(img, str(path))
    out = tmp_path / "out"
    assert run_cli("detect", "--run", run2d, "--input", path, "--out", out, "--no-png") == 0
    for name in ("rotated_score.nii.gz", "rotated_mask.nii.gz"):
        result = sitk.ReadImage(str(out / name))
        assert result.GetSize() == img.GetSize()
        assert np.allclose(result.GetSpacing(), img.GetSpacing(), atol=1e-5)
        assert np.allclose(result.GetOrigin(), img.GetOrigin(), atol=1e-4)
        assert np.allclose(result.GetDirection(), img.GetDirection(), atol=1e-5)
    # Scored everywhere the scan has voxels: no constant band left by the crop/pad to the model grid.
    score = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rotated_score.nii.gz")))
    assert np.isfinite(score).all() and (np.ptp(score, axis=0) > 0).all() and (np.ptp(score, axis=1) > 0).all()
