"""Issue 19 through the CLI with a trained run: resume redoes missing files, SIGTERM, report and detect leave nothing
half-done behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk

from cli_helpers import FAST, run_cli
from iltm import io as iltm_io
from iltm.layout import DETECTION_RECORD, MASK_SUFFIX, SCORE_SUFFIX


def hidden_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith(".")]


def test_resume_redoes_a_finished_iteration_whose_files_are_gone(run2d, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run2d, run)
    last = max(r["iteration"] for r in json.loads((run / "history.json").read_text())["iterations"])
    (run / f"iteration_{last:03d}" / "transformer.pt").unlink()
    first_mask = sorted((run / "iteration_000" / "masks").iterdir())[0]
    first_mask.unlink()
    image = sorted(json.loads((run / "manifest.json").read_text())["images"], key=lambda r: r["id"])[0]["image"]

    # detection no longer falls back to the iteration before without a word
    assert run_cli("detect", "--run", run, "--input", image, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"iteration {last} is recorded as finished" in err and "--resume" in err
    assert not (tmp_path / "o").exists()

    assert run_cli("train", "--resume", run) == 0
    assert "redoing it" in capsys.readouterr().err
    assert (run / f"iteration_{last:03d}" / "transformer.pt").is_file()
    assert first_mask.is_file()
    history = json.loads((run / "history.json").read_text())
    assert history["finished"] and last in [r["iteration"] for r in history["iterations"]]
    assert run_cli("detect", "--run", run, "--input", image, "--out", tmp_path / "o") == 0


def test_report_that_fails_after_the_history_figure_leaves_no_figure(run2d, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run2d, run)
    masks = run / "iteration_001" / "masks"
    sorted(masks.iterdir())[0].unlink()
    assert run_cli("report", run) == 2
    assert MASK_SUFFIX in capsys.readouterr().err
    assert not (run / "report").exists()
    assert hidden_files(run) == []


def test_a_write_that_fails_mid_scan_takes_back_that_scans_outputs(run2d, cohort2d, tmp_path, monkeypatch, capsys):
    real = sitk.WriteImage

    def mask_disk_full(img, name, *args, **kwargs):
        real(img, name, *args, **kwargs)
        if "_mask" in name:
            with open(name, "r+b") as fh:
                fh.truncate(100)

    monkeypatch.setattr(iltm_io.sitk, "WriteImage", mask_disk_full)
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(iltm_io.shutil, "disk_usage", lambda path: usage._replace(free=0))
    out = tmp_path / "out"
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", out, "--no-png") == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("iltm: error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and MASK_SUFFIX in errors[0]
    assert not out.exists(), list(out.iterdir())


def test_detect_lists_past_an_undecodable_empty_sub_folder(run2d, cohort2d, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(sorted((cohort2d / "images").glob("*.nii.gz"))[0], folder / "good.nii.gz")
    os.mkdir(bytes(folder) + b"/\xff")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "iltm", "detect", "--run", str(run2d), "--input", str(folder),
                           "--out", str(out), "--no-png", "--progress", "none"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [DETECTION_RECORD, "good" + MASK_SUFFIX, "good" + SCORE_SUFFIX]


def test_sigterm_is_handled_like_ctrl_c_and_the_run_resumes(cohort2d, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "iltm", "train", "--data", str(cohort2d), "--out", str(run), "--preset", "tiny",
            "--max-iterations", "1", "--progress", "jsonl", *FAST, "--set", "vqvae.epochs=40"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until the VQ-VAE is training, then cancel as Slicer does
        if '"stage": "train VQ-VAE"' in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    final = [ln for ln in stderr.splitlines() if ln.startswith("iltm: ") and not ln.startswith("iltm: warning:")]
    assert len(final) == 1 and final[0].startswith("iltm: terminated"), stderr
    assert hidden_files(run) == []
    assert (run / "config.yaml").is_file() and (run / "manifest.json").is_file()
    assert run_cli("train", "--resume", run) == 0
    assert json.loads((run / "history.json").read_text())["finished"]


@pytest.mark.parametrize("target", ["file", "under a file"])
def test_detect_out_that_cannot_be_a_folder_fails_before_the_work(run2d, cohort2d, tmp_path, capsys, target):
    taken = tmp_path / "taken"
    taken.write_text("x")
    out = taken if target == "file" else taken / "sub"
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    start = time.perf_counter()
    assert run_cli("detect", "--run", run2d, "--input", image, "--out", out) == 2
    assert time.perf_counter() - start < 5  # refused before the model is loaded or any scan is scored
    assert "--out" in capsys.readouterr().err
