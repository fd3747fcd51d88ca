"""Shared pytest set-up: one CPU thread per test process (CI machines are small and shared), and one small trained
2D run that the CLI and bad-input tests share (session scope: it is trained once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, run_cli

torch.set_num_threads(1)

@pytest.fixture(scope="session")
def cohort2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort2d")
    assert run_cli("synth", "--out", out, "--dims", "2", "--n", "8", "--anomalous-fraction", "1", "--seed", "3") == 0
    return out


@pytest.fixture(scope="session")
def run2d(cohort2d, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run2d"
    # tiny fits the full-cohort Transformer of the iteration detection uses only: iteration 0's is asked for too,
    # and detection keeps the last iteration whatever these few-epoch models predict (tests read its outputs)
    assert run_cli("train", "--data", cohort2d, "--out", run, "--preset", "tiny", "--max-iterations", "1",
                   "--seed", "0", "--full-fit", "0", "--set", "iltm.select_iteration=last", *FAST) == 0
    return run


