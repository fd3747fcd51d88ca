"""Data-parallel training under torchrun: two CPU processes (gloo) train one run folder together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import FAST


@pytest.mark.slow
def test_torchrun_two_processes_train_one_run(cohort2d, tmp_path):
    run = tmp_path / "ddp_run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "iltm", "train", "--data", str(cohort2d), "--out", str(run), "--preset", "tiny",
           "--max-iterations", "1", "--device", "cpu", "--progress", "none", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert history["finished"]
    n_scans = len(list((cohort2d / "images").glob("*.nii.gz")))
    for rec in history["iterations"]:
        k = rec["iteration"]
        # Detection is sharded over the ranks; together they must have written every scan's mask exactly once.
        assert len(list((run / f"iteration_{k:03d}" / "masks").glob("*_mask.nii.gz"))) == n_scans
        assert len(list((run / f"iteration_{k:03d}" / "token_masks").glob("*.npy"))) == n_scans
    assert not list(run.rglob("*.tmp*"))
