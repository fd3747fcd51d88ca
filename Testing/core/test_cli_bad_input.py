"""Bad input through the real CLI (child processes): one line on stderr naming the file, exit code 2, no traceback,
and no output file for the bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from cli_helpers import FAST, cli_subprocess


def assert_clean_failure(proc, names: str) -> str:
    """Exit 2, exactly one stderr line starting 'iltm: error:' that names ``names``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iltm: error:")]
    assert len(errors) == 1, proc.stderr
    assert names in errors[0], errors[0]
    return errors[0]


def write(img_array: np.ndarray, path: Path, spacing=None) -> Path:
    img = sitk.GetImageFromArray(img_array.astype(np.float32))
    if spacing:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    empty = d / "empty.nii.gz"
    empty.write_bytes(b"")
    corrupt = d / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream at all")
    unknown = d / "notes.xyz"
    unknown.write_text("hello")
    nan = np.ones((64, 64), np.float32)
    nan[3, 4] = np.nan
    return {
        "missing": d / "missing.nii.gz",
        "empty": empty,
        "corrupt": corrupt,
        "unreadable format": unknown,
        "nan": write(nan, d / "nan.nii.gz"),
        "too small": write(np.ones((2, 2), np.float32), d / "small.nii.gz"),
        "3d to 2d model": write(np.ones((16, 64, 64), np.float32), d / "volume.nii.gz"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "unreadable format", "nan", "too small",
                                  "3d to 2d model"])
def test_detect_rejects_bad_image(run2d, bad_inputs, tmp_path, case):
    path = bad_inputs[case]
    out = tmp_path / "out"
    proc = cli_subprocess("detect", "--run", run2d, "--input", path, "--out", out)
    line = assert_clean_failure(proc, str(path) if case != "unreadable format" else path.name)
    if case == "3d to 2d model":
        assert "3D" in line and "2D" in line
    assert not out.exists() or not any(out.iterdir()), "an output was written for a bad input"


def test_detect_folder_keeps_good_outputs_and_names_bad_ones(run2d, cohort2d, bad_inputs, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    shutil.copy(good, folder / "good.nii.gz")
    shutil.copy(bad_inputs["nan"], folder / "nan.nii.gz")
    out = tmp_path / "out"
    proc = cli_subprocess("detect", "--run", run2d, "--input", folder, "--out", out, "--no-png")
    assert_clean_failure(proc, "nan.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["detect.json", "good_mask.nii.gz", "good_score.nii.gz"]


def test_detect_rejects_incomplete_or_foreign_runs(run2d, cohort2d, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    broken = tmp_path / "broken"
    shutil.copytree(run2d, broken)
    (broken / "vqvae.pt").unlink()
    assert_clean_failure(cli_subprocess("detect", "--run", broken, "--input", image, "--out", tmp_path / "o1"),
                         "vqvae.pt")

    newer = tmp_path / "newer"
    shutil.copytree(run2d, newer)
    cfg = yaml.safe_load((newer / "config.yaml").read_text(encoding="utf-8"))
    cfg["version"] = 99
    (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = assert_clean_failure(cli_subprocess("detect", "--run", newer, "--input", image, "--out", tmp_path / "o2"),
                                "config.yaml")
    assert "incompatible version" in line

    damaged = tmp_path / "damaged"
    shutil.copytree(run2d, damaged)
    (damaged / "iteration_000" / "transformer.pt").write_bytes(b"garbage")
    assert_clean_failure(cli_subprocess("detect", "--run", damaged, "--input", image, "--out", tmp_path / "o3",
                                        "--iteration", "0"), "transformer.pt")

    assert_clean_failure(cli_subprocess("detect", "--run", tmp_path / "nothing", "--input", image,
                                        "--out", tmp_path / "o4"), "nothing")
    assert_clean_failure(cli_subprocess("detect", "--run", run2d, "--input", image, "--out", tmp_path / "o5",
                                        "--iteration", "7"), "iteration 7")
    for out in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / out).exists()


def test_train_lists_all_unreadable_inputs_then_skips_them_on_request(cohort2d, bad_inputs, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cohort2d / "images", data)
    shutil.copy(bad_inputs["corrupt"], data / "corrupt.nii.gz")
    shutil.copy(bad_inputs["nan"], data / "nan.nii.gz")
    run = tmp_path / "run"
    line = assert_clean_failure(cli_subprocess("train", "--data", data, "--out", run, "--preset", "tiny"), str(data))
    assert "corrupt.nii.gz" in line and "nan.nii.gz" in line and "--skip-unreadable" in line
    assert not run.exists()

    proc = cli_subprocess("train", "--data", data, "--out", run, "--preset", "tiny", "--max-iterations", "0",
                          "--skip-unreadable", "--progress", "none", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "corrupt.nii.gz" in proc.stderr and "nan.nii.gz" in proc.stderr
    manifest = (run / "manifest.json").read_text(encoding="utf-8")
    assert "corrupt" not in manifest and "nan.nii" not in manifest


def test_train_rejects_mixed_dimensionality_and_bad_settings(cohort2d, bad_inputs, tmp_path):
    data = tmp_path / "mixed"
    shutil.copytree(cohort2d / "images", data)
    shutil.copy(bad_inputs["3d to 2d model"], data / "volume.nii.gz")
    line = assert_clean_failure(cli_subprocess("train", "--data", data, "--out", tmp_path / "r1"), "volume.nii.gz")
    assert "3D" in line
    assert_clean_failure(cli_subprocess("train", "--data", cohort2d, "--out", tmp_path / "r2",
                                        "--set", "vqvae.nonsense=3"), "vqvae.nonsense")
    assert_clean_failure(cli_subprocess("train", "--data", cohort2d, "--out", tmp_path / "r3",
                                        "--preset", "huge"), "--preset")
    assert_clean_failure(cli_subprocess("train", "--resume", tmp_path / "nowhere"), "nowhere")
    assert_clean_failure(cli_subprocess("evaluate", "--scores", tmp_path / "none", "--labels", cohort2d / "labels"),
                         "none")
