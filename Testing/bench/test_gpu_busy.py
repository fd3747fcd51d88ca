"""iltm_bench.gpu_busy: the share of a command's time the GPU was busy, from a sampler's percentages."""

from __future__ import annotations

import shlex
import sys

from iltm_bench import gpu_busy


def fake_sampler(values: list[str]) -> str:
    """A sampler that prints ``values`` (one per line, flushed) and then waits to be terminated, as nvidia-smi -lms."""
    code = ("import sys, time\n"
            f"for v in {values!r}:\n    print(v, flush=True)\n"
            "time.sleep(60)\n")
    return shlex.join([sys.executable, "-c", code])


def test_parse_skips_what_is_not_a_percentage():
    assert gpu_busy.parse_percentages(["utilization.gpu [%]", " 80 %", "100", "", "No devices were found", "0\n"]) \
        == [80.0, 100.0, 0.0]


def test_the_mean_of_the_samples_is_the_busy_share_and_the_exit_status_is_kept(capsys):
    # The command outlives the sampler's three lines, so all of them are read before it ends.
    command = [sys.executable, "-c", "import time, sys; time.sleep(1.5); sys.exit(3)"]
    code = gpu_busy.main(["--sampler", fake_sampler(["100", "50", "0"]), "--", *command])
    out = capsys.readouterr().out
    assert code == 3
    assert "3 samples, GPU busy 50.0 % of the time" in out and "1 samples idle" in out and "exit 3" in out


def test_no_command_is_a_usage_error(capsys):
    try:
        gpu_busy.main(["--sampler", "true"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("no command was accepted")
    assert "give the command" in capsys.readouterr().err
