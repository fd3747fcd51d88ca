"""Testing/Benchmarks/preset_cost.py: the run-cost model and a smoke run."""

import importlib
import contextlib
import json

import pytest
import torch



@pytest.fixture(scope="module")
def preset_cost():
    return importlib.import_module("iltm_bench.preset_cost")


def test_the_run_model_counts_the_tiny_presets_steps(preset_cost):
    # tiny: VQ-VAE 200 epochs x 6 batches of 8; the full-cohort Transformer 80 epochs x 3 batches of 16, fitted once
    # (for the iteration detection uses); two folds of 24 scans (2 batches each) in each of 4 iterations; 48
    # training scans scored per iteration. paper (no folds) fits the full one in each of its 6 iterations.
    est = preset_cost.run_estimate("tiny", {"vqvae_step": 1.0, "transformer_step": 1.0, "detection": 1.0}, 48)
    assert est == {"vqvae": 1200, "transformer": 240, "folds": 1280, "detect": 192}
    paper = preset_cost.run_estimate("paper", {"vqvae_step": 1.0, "transformer_step": 1.0, "detection": 1.0}, 48)
    assert paper["transformer"] == 6 * 300 * 6 and paper["folds"] == 0  # 300 epochs of 6 batches of 8


def test_stage_times_are_read_from_a_history(preset_cost, tmp_path):
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"vqvae": {"seconds": 10.0}, "iterations": [
        {"iteration": 0, "train_seconds": 2.0, "fold_train_seconds": 3.0, "detect_seconds": 1.0},
        {"iteration": 1, "train_seconds": 4.0, "fold_train_seconds": None, "detect_seconds": 0.5}]}))
    assert preset_cost.measured_stages(history) == {"vqvae": 10.0, "transformer": 6.0, "folds": 3.0, "detect": 1.5}


def test_a_smoke_run_prints_every_stage_for_every_preset(preset_cost, capsys):
    preset_cost.main(["--dims", "2", "--size", "16", "16", "--n-train", "8", "--presets", "tiny", "small",
                      "--steps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for stage in ("vqvae_step", "transformer_step", "detection", "vqvae", "folds", "detect", "total"):
        assert any(line.split()[:1] == [stage] for line in out.splitlines()), stage
    assert "(  1.0x)" in out and "tiny" in out and "small" in out


def test_a_size_of_the_wrong_length_is_refused(preset_cost):
    with pytest.raises(SystemExit):
        preset_cost.main(["--dims", "3", "--size", "16", "16"])


def test_several_devices_get_a_column_each_and_bf16_runs_under_autocast(preset_cost, capsys):
    preset_cost.main(["--dims", "2", "--size", "16", "16", "--n-train", "8", "--presets", "tiny", "--devices", "cpu",
                      "cpu-bf16", "--steps", "1", "--threads", "1"])
    captured = capsys.readouterr()
    header = next(line for line in captured.out.splitlines() if line.split()[:1] == ["tiny@cpu"])
    assert header.split() == ["tiny@cpu", "tiny@cpu-bf16"]
    assert "tiny@cpu-bf16: vqvae_step" in captured.err  # each column is reported as soon as it is measured
    device, precision = preset_cost.autocast("cpu-bf16")
    with precision():
        assert device.type == "cpu" and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    assert preset_cost.autocast("cpu")[1] is contextlib.nullcontext


@pytest.mark.parametrize("device", ["tpu", "cuda:7" if not torch.cuda.is_available() else "tpu"])
def test_a_device_that_is_not_here_is_refused(preset_cost, device, capsys):
    with pytest.raises(SystemExit):
        preset_cost.main(["--dims", "2", "--size", "16", "16", "--devices", device])
    assert f"'{device}' is not available here" in capsys.readouterr().err


def test_a_measured_run_is_compared_with_the_estimate_for_its_own_iteration_count(preset_cost, tmp_path, capsys):
    unit = {"vqvae_step": 1.0, "transformer_step": 1.0, "detection": 1.0}
    assert preset_cost.run_estimate("paper", unit, 48, max_iterations=1)["transformer"] == 2 * 300 * 6
    assert preset_cost.run_estimate("paper", unit, 48, max_iterations=1)["detect"] == 2 * 48
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"vqvae": {"seconds": 10.0}, "iterations": [
        {"iteration": 0, "train_seconds": 2.0, "fold_train_seconds": 3.0, "detect_seconds": 1.0},
        {"iteration": 1, "train_seconds": 4.0, "fold_train_seconds": None, "detect_seconds": 0.5}]}))
    preset_cost.main(["--dims", "2", "--size", "16", "16", "--n-train", "8", "--presets", "tiny", "--steps", "1",
                      "--threads", "1", "--history", str(history)])
    out = capsys.readouterr().out
    assert "(2 iterations)" in out and "vqvae 10 / " in out and "total 20 / " in out  # 10 + 6 + 3 + 1.5
