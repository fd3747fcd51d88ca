"""Detection on a CUDA device agrees with the CPU (skipped where torch sees no CUDA device).

The deterministic steps (tokens, their probabilities, the flagged set, the KDE of given reconstructions) must match
the CPU's; the random ones (resampling, dropout) draw from the device's own generator, so the maps are compared
through what they find, not voxel by voxel.
"""

from __future__ import annotations

import importlib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import run_cli
from iltm import kde
from iltm.detect import Detector
from iltm.io import image_id
from iltm.metrics import auroc
from iltm.vqvae import decode_tokens, encode_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _first_scan(cohort):
    image = sorted((cohort / "images").iterdir())[0]
    return image, cohort / "labels" / image.name


def test_the_deterministic_steps_of_detection_match_the_cpu(run2d, cohort2d):
    image, _ = _first_scan(cohort2d)
    cpu = Detector.from_run(run2d, device="cpu")
    gpu = Detector.from_run(run2d, device="cuda")
    array, _ = cpu.preprocessor.forward(sitk.ReadImage(str(image)), where=str(image))
    x = torch.from_numpy(np.ascontiguousarray(array))[None].float()
    with torch.no_grad():
        tokens = [encode_tokens(d.vqvae, x.to(d.device)).reshape(-1) for d in (cpu, gpu)]
        # cuDNN may run the convolutions in TF32 (torch's default), which can flip a near tie between two codes.
        assert (tokens[0] == tokens[1].cpu()).float().mean() >= 0.98
        probs = [d.transformer.token_probabilities(tokens[0][None].to(d.device))[0].cpu() for d in (cpu, gpu)]
        np.testing.assert_allclose(probs[1].numpy(), probs[0].numpy(), rtol=1e-3, atol=1e-5)
        t = cpu.cfg.detection.resampling_threshold
        near = (probs[0] - t).abs() < 1e-4  # a probability this close to t may fall either side of it
        assert torch.equal((probs[0] < t)[~near], (probs[1] < t)[~near])
        # The same reconstructions give the same density on either device.
        latents = tokens[0].reshape(1, *cpu.latent_shape).repeat(3, *[1] * len(cpu.latent_shape))
        recon = decode_tokens(cpu.vqvae, latents, batch=3)[:, 0]
        recon = recon + 0.01 * torch.randn(recon.shape, generator=torch.Generator().manual_seed(0))
        on_cpu = kde.log_density(recon, x[0, 0], cpu.cfg.eps())
        on_gpu = kde.log_density(recon.cuda(), x[0, 0].cuda(), cpu.cfg.eps())
    assert on_gpu.is_cuda
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu.numpy(), rtol=1e-4, atol=1e-4)


def test_detect_on_cuda_writes_maps_on_the_input_grid_that_find_what_the_cpu_finds(run2d, cohort2d, tmp_path):
    image, label = _first_scan(cohort2d)
    aurocs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert run_cli("detect", "--run", run2d, "--input", image, "--out", out, "--device", device) == 0
        score = sitk.ReadImage(str(out / f"{image_id(image)}_score.nii.gz"))
        source = sitk.ReadImage(str(image))
        assert score.GetSize() == source.GetSize() and score.GetSpacing() == source.GetSpacing()
        assert score.GetOrigin() == source.GetOrigin() and score.GetDirection() == source.GetDirection()
        values = sitk.GetArrayFromImage(score)
        assert np.isfinite(values).all()
        aurocs[device] = auroc(values, sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0)
    assert abs(aurocs["cuda"] - aurocs["cpu"]) < 0.05, aurocs


def test_preset_cost_times_a_cuda_column_beside_the_cpu(capsys):
    importlib.import_module("iltm_bench.preset_cost").main(["--dims", "2", "--size", "16", "16", "--n-train", "8", "--presets",
                                               "tiny", "--devices", "cpu", "cuda", "--steps", "1"])
    out = capsys.readouterr().out
    assert "tiny@cpu" in out and "tiny@cuda" in out
