"""Detection at scale (issue 23, items 2 and 5): the streamed KDE, and overlapping blended windows on large scans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iltm import kde
from iltm.detect import DetectionResult, Detector, window_starts
from iltm.vqvae import encode_tokens


@pytest.mark.parametrize("shape", [(24, 20), (6, 7, 9)])
def test_streamed_log_density_matches_the_in_memory_one(shape):
    gen = torch.Generator().manual_seed(0)
    samples = torch.rand(37, *shape, generator=gen) * 0.3 + torch.linspace(0, 0.7, shape[-1])
    image = torch.rand(*shape, generator=gen)
    reference = kde.log_density(samples, image, eps=0.05)
    streamed = kde.StreamedLogDensity(image, eps=0.05, chunk_voxels=50)
    batches = [samples[0:5], samples[5:21], samples[21:22], samples[22:]]   # uneven, one of a single sample
    for b in batches:
        streamed.add_moments(b)
    for b in batches:
        streamed.add_kernels(b)
    result = streamed.result()
    assert result.shape == reference.shape and result.dtype == torch.float32
    assert float((result - reference).abs().max()) < 1e-5
    assert float(reference.std()) > 0.1  # the maps have structure to agree on


def test_streamed_log_density_refuses_an_incomplete_second_pass():
    image = torch.zeros(4, 4)
    streamed = kde.StreamedLogDensity(image, eps=0.05)
    streamed.add_moments(torch.rand(6, 4, 4))
    streamed.add_kernels(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="pass 2 saw 3 samples, pass 1 saw 6"):
        streamed.result()


@pytest.fixture(scope="module")
def detector(run2d):
    return Detector.from_run(run2d, device="cpu")


def _scan(detector, cohort):
    image = sorted((cohort / "images").iterdir())[0]
    array, _ = detector.preprocessor.forward(sitk.ReadImage(str(image)), where=str(image))
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def test_streamed_detection_gives_the_in_memory_map(detector, cohort2d):
    x = _scan(detector, cohort2d)
    tokens = encode_tokens(detector.vqvae, x[None]).reshape(1, -1)
    latents = tokens.repeat(7, 1).reshape(7, *detector.latent_shape)
    in_memory = detector.log_density(latents, x[0], seed=11, batch=3)
    streamed = detector.log_density(latents, x[0], seed=11, batch=3, streamed=True)
    # 1e-5, relative where |log f| > 1: the in-memory reference is float32, whose own rounding at |log f| ~ 100 is 1e-5.
    assert float(((in_memory - streamed).abs() / in_memory.abs().clamp(min=1)).max()) < 1e-5
    other_seed = detector.log_density(latents, x[0], seed=12, batch=3, streamed=True)
    assert float((in_memory - other_seed).abs().max()) > 1e-3  # the dropout draws matter: the seed was replayed


def test_detection_streams_above_the_memory_setting_only(detector, cohort2d, monkeypatch):
    x = _scan(detector, cohort2d)
    calls = []
    original = Detector.log_density

    def spy(self, latents, image, seed, batch, streamed=False):
        calls.append((streamed, batch))
        return original(self, latents, image, seed, batch, streamed)

    monkeypatch.setattr(Detector, "log_density", spy)
    det = detector.cfg.detection
    default = detector.detect_array(x, generator=torch.Generator().manual_seed(2))
    assert calls == [(False, det.decode_batch)]
    small = dataclasses.replace(det, stream_above_mb=0.0)
    streaming = Detector(dataclasses.replace(detector.cfg, detection=small), detector.vqvae, detector.transformer,
                         detector.latent_shape, detector.device)
    result = streaming.detect_array(x, generator=torch.Generator().manual_seed(2))
    assert calls[1] == (True, 1)  # no budget: one reconstruction at a time
    assert torch.equal(result.flagged, default.flagged)
    assert result.log_density.shape == default.log_density.shape and bool(torch.isfinite(result.log_density).all())


def test_decoder_batches_and_streaming_fit_the_memory_setting(detector):
    det, voxels = detector.cfg.detection, 4096

    def with_budget(mb):
        budget = dataclasses.replace(det, stream_above_mb=mb)
        return Detector(dataclasses.replace(detector.cfg, detection=budget), detector.vqvae, detector.transformer,
                        detector.latent_shape, detector.device)

    per = detector.decoder_bytes(voxels)
    assert per == 4 * 4 * detector.cfg.vqvae.channels[0] * voxels / 4  # 2D: half resolution is a quarter
    fits = (Detector.reconstruction_bytes(10, voxels) + per) / 2 ** 20
    assert not with_budget(fits).streams(10, voxels) and with_budget(fits * 0.99).streams(10, voxels)
    assert with_budget(0.0).decoder_batch(voxels) == 1
    assert with_budget(2.5 * per / 2 ** 20).decoder_batch(voxels) == min(2, det.decode_batch)
    assert with_budget(1e6).decoder_batch(voxels) == det.decode_batch


def test_healing_batches_fit_the_memory_setting(detector, cohort2d, monkeypatch):
    det = detector.cfg.detection
    flagged = torch.zeros(int(np.prod(detector.latent_shape)), dtype=torch.bool)
    assert detector.heal_batch(flagged) == det.samples  # nothing to heal
    flagged[[3, 10]] = True
    per_sequence = detector.transformer.heal_bytes(flagged)
    cache = sum(t.numel() * t.element_size() for kv in detector.transformer._new_cache(1, 11) for t in kv)
    assert cache < per_sequence  # the KV cache up to the last flagged token, the noise and a piece's activations
    detectors = {}
    for budget_mb, expected in ((0.0, 1), (2.5 * per_sequence / 2 ** 20, 2), (1e6, det.samples)):
        budget = dataclasses.replace(det, stream_above_mb=budget_mb)
        detectors[budget_mb] = Detector(dataclasses.replace(detector.cfg, detection=budget), detector.vqvae,
                                        detector.transformer, detector.latent_shape, detector.device)
        assert detectors[budget_mb].heal_batch(flagged) == min(expected, det.samples)

    calls = []
    heal = detector.transformer.heal

    def spy(*args, batch=None, **kwargs):
        calls.append((batch, heal(*args, batch=batch, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(detector.transformer, "heal", spy)
    x = _scan(detector, cohort2d)
    results = [d.detect_array(x, resampling_threshold=0.5, generator=torch.Generator().manual_seed(4))
               for d in (detectors[0.0], detectors[1e6])]
    assert [batch for batch, _ in calls] == [1, det.samples] and bool(results[0].flagged.any())
    assert torch.equal(calls[0][1], calls[1][1])  # the same draws whatever the batch


def test_cuda_graphs_setting_chooses_how_healing_runs(detector, cohort2d, monkeypatch):
    """Detection heals with the default steps (CUDA graphs on CUDA, eager on a CPU) and its batch sized for them;
    ``detection.cuda_graphs=false`` asks for eager steps on any device."""
    seen = []
    heal, heal_bytes = detector.transformer.heal, detector.transformer.heal_bytes
    monkeypatch.setattr(detector.transformer, "heal", lambda *a, steps="unset", **kw: seen.append(("heal", steps))
                        or heal(*a, steps=steps, **kw))
    monkeypatch.setattr(detector.transformer, "heal_bytes", lambda flagged, steps="unset":
                        seen.append(("bytes", steps)) or heal_bytes(flagged, steps))
    x = _scan(detector, cohort2d)
    for graphs in (True, False):
        det = dataclasses.replace(detector.cfg.detection, cuda_graphs=graphs)
        d = Detector(dataclasses.replace(detector.cfg, detection=det), detector.vqvae, detector.transformer,
                     detector.latent_shape, detector.device)
        d.detect_array(x, resampling_threshold=0.5, generator=torch.Generator().manual_seed(4))
    assert seen == [("bytes", None), ("heal", None), ("bytes", "eager"), ("heal", "eager")]


def test_detection_with_static_healing_steps_gives_the_eager_map(detector, cohort2d, monkeypatch):
    """What CUDA graphs replay, run directly on a CPU through the whole detection: the same map as eager steps,
    with the batch sized for the static cache."""
    from iltm.transformer import TokenTransformer

    x = _scan(detector, cohort2d)
    eager = detector.detect_array(x, resampling_threshold=0.5, generator=torch.Generator().manual_seed(6))
    default = TokenTransformer.heal_steps
    monkeypatch.setattr(TokenTransformer, "heal_steps", lambda self, steps=None: default(self, steps or "static"))
    flagged = eager.flagged
    assert bool(flagged.any()) and detector.heal_batch(flagged) <= detector.heal_batch(flagged, "eager")
    static = detector.detect_array(x, resampling_threshold=0.5, generator=torch.Generator().manual_seed(6))
    assert detector.transformer._static_kept  # the static steps ran
    assert torch.equal(static.flagged, flagged) and torch.equal(static.log_density, eager.log_density)


def test_window_starts_overlap_and_cover():
    assert window_starts(64, 32, 0.0) == [0, 32]
    assert window_starts(64, 32, 0.25) == [0, 24, 32]
    assert window_starts(32, 32, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 16 for a, b in zip(starts, starts[1:]))


def test_a_constant_scan_larger_than_the_grid_has_no_seams(detector, monkeypatch):
    """Each window's map is what detection on a window gives: a level of its own (other draws) and a dip towards its
    edges (the decoder's zero padding). Abutting tiles put a jump of a level difference plus the dips at every border;
    blended windows leave no step between neighbouring voxels above 0.4 nats inside the scan (abutting tiles: 1.0)."""
    levels = iter([0.0, 1.0] * 50)

    def window_map(self, image, resampling_threshold=None, generator=None):
        shape = image.shape[1:]
        edge = torch.ones(shape)
        for axis, n in enumerate(shape):
            ramp = torch.arange(n, dtype=torch.float32)
            distance = torch.minimum(ramp, n - 1 - ramp).reshape([-1 if a == axis else 1 for a in range(len(shape))])
            edge = torch.minimum(edge, distance.expand(shape))
        log_f = -5.0 - next(levels) - 2.0 * torch.exp(-edge / 1.5)
        tokens = int(np.prod(self.latent_shape))
        return DetectionResult(log_f, torch.ones(tokens), torch.zeros(tokens, dtype=torch.bool), 0.0)

    monkeypatch.setattr(Detector, "detect_array", window_map)
    model = tuple(detector.cfg.data.spatial_size[::-1])                  # (y, x) of the model grid
    big = sitk.GetImageFromArray(np.full((2 * model[0] + 8, 2 * model[1] + 8), 3.0, np.float32))
    score, _, result = detector.detect_image(big, generator=torch.Generator().manual_seed(0))
    s = sitk.GetArrayFromImage(score).astype(np.float64)
    assert s.shape == (2 * model[0] + 8, 2 * model[1] + 8)
    inside = s[4:-4, 4:-4]                                               # the scan's own edges dip in any case
    steps = max(np.abs(np.diff(inside, axis=0)).max(), np.abs(np.diff(inside, axis=1)).max())
    assert steps < 0.4, steps
    assert inside.max() - inside.min() > 0.5  # the windows' levels do differ: blending has work to do
