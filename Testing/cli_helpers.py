"""Helpers for tests that drive the real ``iltm`` CLI (in process, or as a child process)."""

from __future__ import annotations

import os
import subprocess
import sys

from iltm.cli import main

# The tiny preset cut down further so a whole training run takes seconds on one core.
FAST = ["--set", "vqvae.epochs=4", "--set", "transformer.epochs=4", "--set", "detection.samples=4",
        "--set", "detection.dropout_passes=2", "--set", "data.augment=false"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args] + ["--progress", "none"])


def cli_subprocess(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "iltm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, **kwargs)
