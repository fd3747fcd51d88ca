"""iltm_bench.cpu_profile: the CPU speedups give the reference path's results, and the profile runs."""

from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import torch

from iltm.config import TransformerConfig
from iltm.detect import one_cpu_thread
from iltm.transformer import TokenTransformer

V, L = 13, 40


@pytest.fixture(scope="module")
def cpu_profile():
    return importlib.import_module("iltm_bench.cpu_profile")


def make_model(seed=0):
    torch.manual_seed(seed)
    model = TokenTransformer(TransformerConfig(n_layer=2, n_head=2, n_embd=16), num_codes=V, seq_len=L)
    with torch.no_grad():  # larger weights than the init, so that the context changes the logits visibly
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("masked", [False, True])
def test_training_pass_matches_the_reference(cpu_profile, masked):
    # Unmasked: the fused kernel's causal mask instead of a bool (T, K) one; masked: a float mask built once.
    model = make_model().train()
    reference = cpu_profile.reference_copy(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (4, L), generator=g)
    mask = torch.rand(tokens.shape, generator=g) < 0.3 if masked else None
    loss, grads = cpu_profile.transformer_step(model, tokens, mask)
    ref_loss, ref_grads = cpu_profile.transformer_step(reference, tokens, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
    # The comparison can fail: gradients of another batch differ.
    _, other = cpu_profile.transformer_step(reference, tokens.roll(1, dims=1), mask)
    assert not torch.allclose(other[0], ref_grads[0], atol=1e-4)


def test_masked_forward_matches_the_reference_and_would_show_a_wrong_mask(cpu_profile):
    model = make_model(2)
    reference = cpu_profile.reference_copy(model)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (3, L), generator=g)
    mask = torch.rand(tokens.shape, generator=g) < 0.3
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, mask), reference(tokens, mask), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(tokens, mask), reference(tokens, None), atol=1e-3)


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_healing_in_one_thread_draws_what_the_reference_draws(cpu_profile, share):
    # Prefill (causal), cached single steps (no mask) and teacher-forced runs (float mask), under one thread,
    # against the reference masks under two threads: the same generator must draw the same sequences.
    model = make_model(4)
    reference = cpu_profile.reference_copy(model)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (L,), generator=g)
    flagged = torch.rand(L, generator=g) < share
    flagged[0] = False
    with threads(2), torch.no_grad():
        ref = reference.heal(tokens, flagged, 16, generator=torch.Generator().manual_seed(6))
        new = cpu_profile.new_heal(model, tokens, flagged, 16, generator=torch.Generator().manual_seed(6))
        other = cpu_profile.new_heal(model, tokens, flagged, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(new, ref)
    assert not torch.equal(other, ref)  # the draws do depend on the generator, so equality means something


def test_one_cpu_thread_sets_one_thread_and_restores_the_count():
    with threads(2):
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2


def test_run_calls_follow_the_tiny_presets_step_counts(cpu_profile):
    from iltm.config import preset

    every = cpu_profile.run_calls(preset("tiny"), 40, every_full=True)
    # 40 scans: the VQ-VAE's 2400 steps of two volumes (120 of its 200 epochs);
    # Transformer: 40 scans in 16 + 16 + 8, two folds of 20 in 16 + 4, 80 epochs; in 3D 2 iterations, the first
    # unmasked.
    assert (every["vq_batch"], every["vqvae"]) == (2, 2400)
    assert every["iterations"] == 2 and every["full_fits"] == 2
    # The reference trained it for all 200 epochs in batches of 3 (14 steps an epoch make 2800 >= 2400), the last
    # one a single scan, ran 4 iterations (as 2D still does) and fitted every full Transformer.
    reference = cpu_profile.run_calls(cpu_profile.reference_config(preset("tiny")), 40)
    assert reference["vq_batch"] == 3 and reference["vqvae"] == pytest.approx(200 * (13 + 1 / 3))
    assert reference["unmasked"] == every["unmasked"] and reference["full_fits"] == reference["iterations"] == 4
    assert every["unmasked"] == pytest.approx(80 * (2.5 + 2 * 1.25))
    assert every["masked"] == pytest.approx(every["unmasked"]) and reference["masked"] == pytest.approx(
        3 * every["unmasked"])
    assert every["detect"] == 80 and reference["detect"] == 160
    # tiny fits the full-cohort Transformer (2.5 batches an epoch) of the last iteration only: the folds every time.
    used = cpu_profile.run_calls(preset("tiny"), 40)
    assert used["unmasked"] == pytest.approx(80 * 2 * 1.25)
    assert used["masked"] == pytest.approx(80 * (2 * 1.25 + 2.5))
    assert {k: v for k, v in used.items() if k not in ("unmasked", "masked", "full_fits")} == \
        {k: v for k, v in every.items() if k not in ("unmasked", "masked", "full_fits")}


def test_the_profile_prints_every_stage(cpu_profile):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cpu_profile.main(["--size", "16", "16", "16", "--n-train", "4", "--rounds", "1"])
    text = out.getvalue()
    for stage in ("VQ-VAE step", "Transformer step, unmasked", "Transformer step, 5% masked", "encoding",
                  "likelihood", "healing", "decoding N=60", "KDE", "run (training with its detections)"):
        assert stage in text
