"""``iltm detect`` on a folder of scans: --resume, reading the next scan ahead, bad scans among good ones, torchrun.

Every test scores a few of the tiny 2D cohort's scans with the session's small trained run (``run2d``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import iltm.detect as detect_mod
from cli_helpers import run_cli
from iltm.cli import main
from iltm.run import RunFolder


def _inputs(cohort2d: Path, folder: Path, good: list[str], bad: dict[str, bytes] | None = None) -> Path:
    """``folder`` holding copies of the cohort's first scans named ``good`` and files ``bad`` (name -> bytes)."""
    folder.mkdir()
    for name, image in zip(good, sorted((cohort2d / "images").glob("*.nii.gz"))):
        shutil.copy(image, folder / f"{name}.nii.gz")
    for name, data in (bad or {}).items():
        (folder / name).write_bytes(data)
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stamps(folder: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the files matching ``pattern``: an atomic rewrite gives a file a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob(pattern)}


def _counted(method, calls: list):
    """``method`` that also appends its name to ``calls``."""
    def counted(self, *args, **kwargs):
        calls.append(method.__name__)
        return method(self, *args, **kwargs)
    return counted


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_resume_skips_scans_with_all_outputs_and_redoes_partial_ones(run2d, cohort2d, tmp_path, capsys):
    inputs = _inputs(cohort2d, tmp_path / "in", ["p1", "p2", "p3"])
    out = tmp_path / "out"
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--lesions") == 0
    first = _contents(out)
    assert {"p1_mask.nii.gz", "p1_overlay.png", "p1_lesions.csv", "scans.csv"} <= set(first)
    (out / "p2_mask.nii.gz").unlink()      # interrupted between a scan's files
    (out / "p3_lesions.csv").unlink()      # or run before without --lesions
    complete, partial = _stamps(out, "p1_*"), _stamps(out, "p[23]_score.nii.gz")
    capsys.readouterr()
    assert main(["detect", "--run", str(run2d), "--input", str(inputs), "--out", str(out), "--lesions", "--resume",
                 "--progress", "jsonl"]) == 0
    logs = [e["message"] for e in _events(capsys.readouterr().out) if e["event"] == "log"]
    assert "p1: skipped (outputs complete)" in logs
    for scan in ("p2", "p3"):
        assert any(m.startswith(f"{scan}: ") and "tokens resampled" in m for m in logs), logs
    assert _stamps(out, "p1_*") == complete                      # not written again
    rewritten = _stamps(out, "p[23]_score.nii.gz")
    assert all(rewritten[name][0] != stamp[0] for name, stamp in partial.items())
    # The redone scans give the same bytes, and scans.csv still has p1's totals, recomputed from its maps.
    assert _contents(out) == first


def test_resume_refuses_a_folder_made_with_other_settings(run2d, cohort2d, tmp_path, capsys):
    inputs = _inputs(cohort2d, tmp_path / "in", ["p1", "p2"])
    out = tmp_path / "out"
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--samples", "3") == 0
    record = json.loads((out / "detect.json").read_text())
    assert record["detection.samples"] == 3 and record["iteration"] >= 0 and record["model"] == str(run2d)
    (out / "p2_mask.nii.gz").unlink()
    before = _contents(out)
    capsys.readouterr()
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--samples", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "detect.json" in err and "detection.samples 3 -> 4" in err, err
    assert "Traceback" not in err
    assert _contents(out) == before                     # nothing scored, nothing rewritten
    # The same settings resume; without --resume other settings score every scan again.
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--samples", "3", "--resume") == 0
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--samples", "4") == 0
    assert json.loads((out / "detect.json").read_text())["detection.samples"] == 4


def test_a_folder_of_only_bad_inputs_leaves_no_record(run2d, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bad.nii.gz").write_bytes(b"not an image")
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def test_reading_ahead_gives_the_same_bytes_and_bad_scans_their_own_lines(run2d, cohort2d, tmp_path, capsys,
                                                                        monkeypatch):
    """Also: the models are loaded once for the whole folder."""
    inputs = _inputs(cohort2d, tmp_path / "in", ["p1", "p3"],
                     {"p2_empty.nii.gz": b"", "p4_garbage.nii.gz": b"not an image\n" * 50})
    read_in = []  # the thread each scan was read in
    real_read = detect_mod.read_image

    def read_image(*args, **kwargs):
        read_in.append(threading.current_thread().name)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(detect_mod, "read_image", read_image)
    loads = []  # the models a command loads, whatever the number of scans
    for name in ("load_vqvae", "load_transformer"):
        monkeypatch.setattr(RunFolder, name, _counted(getattr(RunFolder, name), loads))
    outputs = {}
    for ahead in (1, 0):
        monkeypatch.setattr(detect_mod, "READ_AHEAD", ahead)
        read_in.clear()
        loads.clear()
        out = tmp_path / f"ahead{ahead}"
        capsys.readouterr()
        assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", out, "--lesions") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("iltm: error:")]
        assert len(errors) == 2, err
        assert errors[0].startswith(f"iltm: error: {inputs / 'p2_empty.nii.gz'}: ")
        assert errors[1].startswith(f"iltm: error: {inputs / 'p4_garbage.nii.gz'}: ")
        assert sorted(loads) == ["load_transformer", "load_vqvae"]
        assert len(read_in) == 4 and all(name.startswith("iltm-read-ahead") == (ahead > 0) for name in read_in)
        outputs[ahead] = _contents(out)
    assert set(outputs[1]) == {f"{scan}_{kind}" for scan in ("p1", "p3") for kind in
                               ("score.nii.gz", "mask.nii.gz", "overlay.png", "lesions.csv")} | {
        "scans.csv", "detect.json"}
    assert outputs[1] == outputs[0]


@pytest.mark.slow
def test_torchrun_two_processes_score_their_shares_into_one_folder(run2d, cohort2d, tmp_path):
    inputs = _inputs(cohort2d, tmp_path / "in", ["p1", "p2", "p3"], {"p4_empty.nii.gz": b""})
    alone = tmp_path / "alone"
    assert run_cli("detect", "--run", run2d, "--input", inputs, "--out", alone, "--lesions", "--device", "cpu") == 2
    together = tmp_path / "together"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "iltm", "--", "detect", "--run", str(run2d), "--input", str(inputs), "--out", str(together),
           "--lesions", "--device", "cpu", "--progress", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Rank 1 scored p2 and failed p4; rank 0 reports that problem once, after gathering, writes scans.csv and exits
    # with 2 (torchrun's own report follows). Rank 1 has nothing left to write by then: when it is still tearing
    # down as rank 0 exits, torchrun sends it a closing signal, which is harmless (the outputs below are complete).
    assert proc.returncode != 0 and "Root Cause (first observed failure):" in proc.stderr
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0" in root and "exitcode  : 2" in root
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iltm: error:")]
    assert errors == [f"iltm: error: {inputs / 'p4_empty.nii.gz'}: file is empty (0 bytes)"], proc.stderr[-3000:]
    events = _events(proc.stdout)
    assert [e["kind"] for e in events if e["event"] == "output"].count("scans") == 1
    assert [e["failed"] for e in events if e["event"] == "done"] == [1]
    assert _contents(together) == _contents(alone)
    assert (together / "scans.csv").read_text(encoding="utf-8").count("\np") == 3
