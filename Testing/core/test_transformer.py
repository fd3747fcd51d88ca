"""TokenTransformer: latent token masking, loss, KV cache, healing, causality, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iltm.config import TransformerConfig
from iltm import transformer as transformer_mod
from iltm.errors import InputError
from iltm.transformer import CHECKPOINT_VERSION, TokenTransformer, masked_cross_entropy

torch.set_num_threads(1)

V, L = 11, 24


def make_model(seed=0, dropout=0.0, n_layer=2):
    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layer=n_layer, n_head=2, n_embd=16, dropout=dropout)
    model = TokenTransformer(cfg, num_codes=V, seq_len=L)
    # Init weights are small enough that logits barely depend on context; enlarge them so every test that
    # expects a change really sees one.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def random_tokens(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, L), generator=g)


def random_masks(batch, seed):
    """Random scattered masks, plus rows with the first token masked and long masked runs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, L, generator=g) < 0.3
    mask[0, 0] = True
    mask[1, :] = False
    mask[1, 0:10] = True  # long run from the first token
    mask[2, 5:L - 1] = True  # long run to the penultimate token
    mask[3, :] = False  # nothing masked
    return mask


def visible_positions(mask):
    # Position i reads s_{i-1} as its own input; it is unaffected by masked tokens iff that input is not masked.
    return F.pad(~mask[:, :-1], (1, 0), value=True)


def test_shapes_and_bos():
    model = make_model()
    assert model.bos == V
    assert model(random_tokens(3, 0)).shape == (3, L, V)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_tokens_do_not_reach_unmasked_positions(seed):
    model = make_model(seed)
    tokens, mask = random_tokens(6, seed), random_masks(6, seed + 10)
    altered = tokens.clone()
    altered[mask] = (tokens[mask] + torch.randint(1, V, (int(mask.sum()),))) % V  # every masked token differs
    with torch.no_grad():
        before, after = model(tokens, mask), model(altered, mask)
    visible = visible_positions(mask)
    assert torch.allclose(before[visible], after[visible], atol=1e-6, rtol=0)
    # Sanity: the positions that read a masked token themselves do change, and without the mask so would the rest.
    assert not torch.allclose(before[~visible], after[~visible], atol=1e-3)
    with torch.no_grad():
        unmasked_before, unmasked_after = model(tokens), model(altered)
    later = visible & (torch.cumsum(mask.int(), 1) > 0) & (torch.arange(L) > 0)  # after some masked token
    assert not torch.allclose(unmasked_before[later], unmasked_after[later], atol=1e-3)


def test_changing_unmasked_tokens_changes_logits():
    model = make_model()
    tokens, mask = random_tokens(6, 3), random_masks(6, 4)
    k = 12
    mask[:, k] = False
    altered = tokens.clone()
    altered[:, k] = (tokens[:, k] + 1) % V
    with torch.no_grad():
        before, after = model(tokens, mask), model(altered, mask)
    assert not torch.allclose(before[:, k + 1], after[:, k + 1], atol=1e-3)


def test_bos_key_is_never_masked():
    model = make_model()
    tokens = random_tokens(2, 5)
    mask = torch.ones(2, L, dtype=torch.bool)
    with torch.no_grad():
        logits = model(tokens, mask)
    assert torch.isfinite(logits).all()
    loss = masked_cross_entropy(model(tokens, mask), tokens, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # nothing to learn, but it must not fail


def loss(model, tokens, mask=None):
    return masked_cross_entropy(model(tokens, mask), tokens, mask)


def test_loss_is_cross_entropy_over_unmasked_targets():
    model = make_model()
    tokens, mask = random_tokens(6, 6), random_masks(6, 7)
    with torch.no_grad():
        logp = F.log_softmax(model(tokens, mask), dim=-1)
    nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)
    expected = nll[~mask].mean()
    assert torch.allclose(loss(model, tokens, mask), expected, atol=1e-6)
    assert not torch.allclose(nll.mean(), expected, atol=1e-4)  # the mask really changes the value
    with torch.no_grad():
        unmasked_logits = model(tokens)
    assert torch.allclose(loss(model, tokens), F.cross_entropy(unmasked_logits.flatten(0, 1), tokens.flatten()),
                          atol=1e-6)

    # A masked token is still the query input of the next position (only its key is hidden), so alter the masked
    # targets whose value reaches no unmasked target: the last one and those followed by another masked token.
    ignored = mask & F.pad(mask[:, 1:], (0, 1), value=True)
    assert ignored.sum() >= 5
    altered = tokens.clone()
    altered[ignored] = (tokens[ignored] + 3) % V
    assert torch.allclose(loss(model, altered, mask), expected, atol=1e-6)
    assert not torch.allclose(loss(model, altered), loss(model, tokens), atol=1e-4)  # the targets really changed

    model.zero_grad()
    loss(model, tokens, mask).backward()
    for name in ("wte.weight", "head.weight", "blocks.0.attn.c_attn.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_token_probabilities():
    model = make_model()
    tokens, mask = random_tokens(4, 8), random_masks(4, 9)
    probs = model.token_probabilities(tokens, mask)
    assert probs.shape == (4, L) and ((probs > 0) & (probs < 1)).all()
    with torch.no_grad():
        expected = F.softmax(model(tokens, mask), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(probs, expected, atol=1e-6)


@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_kv_cache_matches_full_forward(prefill):
    model = make_model(n_layer=3)
    tokens = random_tokens(3, 10)
    inputs = model._inputs(tokens)
    with torch.no_grad():
        full = model(tokens)
        cache = model._new_cache(3, L)
        pieces = [model._decode(inputs[:, :prefill], 0, cache)] if prefill else []
        pieces += [model._decode(inputs[:, t:t + 1], t, cache) for t in range(prefill, L)]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_matches_full_forward_in_uneven_chunks():
    model = make_model()
    tokens = random_tokens(2, 11)
    inputs = model._inputs(tokens)
    with torch.no_grad():
        cache, pieces = model._new_cache(2, L), []
        for a, b in [(0, 3), (3, 4), (4, 11), (11, 12), (12, L)]:
            pieces.append(model._decode(inputs[:, a:b], a, cache))
        assert torch.allclose(torch.cat(pieces, 1), model(tokens), atol=1e-5, rtol=0)


def test_causality():
    model = make_model()
    tokens = random_tokens(2, 12)
    for k in (0, 7, L - 2):
        altered = tokens.clone()
        altered[:, k] = (tokens[:, k] + 1) % V
        with torch.no_grad():
            before, after = model(tokens), model(altered)
        assert torch.equal(before[:, :k + 1], after[:, :k + 1])
        assert not torch.allclose(before[:, k + 1:], after[:, k + 1:], atol=1e-3)


def flagged_example():
    tokens = random_tokens(1, 13)[0]
    flagged = torch.zeros(L, dtype=torch.bool)
    flagged[[5, 6, 7, 13, 19]] = True
    return tokens, flagged


def test_heal_keeps_unflagged_and_varies_flagged():
    model = make_model()
    tokens, flagged = flagged_example()
    healed = model.heal(tokens, flagged, samples=40, generator=torch.Generator().manual_seed(0))
    assert healed.shape == (40, L) and healed.dtype == torch.long
    assert (healed[:, ~flagged] == tokens[~flagged]).all()
    assert ((healed >= 0) & (healed < V)).all()
    for i in torch.nonzero(flagged).flatten():
        assert healed[:, i].unique().numel() > 1


def test_heal_without_flags_returns_copies():
    model = make_model()
    tokens = random_tokens(1, 14)[0]
    healed = model.heal(tokens, torch.zeros(L, dtype=torch.bool), samples=3)
    assert torch.equal(healed, tokens.repeat(3, 1))


def test_heal_follows_a_dominant_code():
    model = make_model()
    with torch.no_grad():
        model.head.bias[7] = 1e3
    tokens, flagged = flagged_example()
    healed = model.heal(tokens, flagged, samples=10)
    assert (healed[:, flagged] == 7).all()
    assert (healed[:, ~flagged] == tokens[~flagged]).all()


def test_heal_is_reproducible_and_conditions_on_the_healed_prefix():
    model = make_model()
    tokens, flagged = flagged_example()
    a = model.heal(tokens, flagged, 16, generator=torch.Generator().manual_seed(3))
    b = model.heal(tokens, flagged, 16, generator=torch.Generator().manual_seed(3))
    c = model.heal(tokens, flagged, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)

    # Reference without cache: a full forward pass per flagged token on the sequence healed so far, each draw made
    # by the documented rule (a seed per sequence, its Exp(1) noise, argmax p / noise), must make the same draws.
    positions = torch.nonzero(flagged).flatten().tolist()
    seeds = torch.randint(0, 2 ** 62, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    noise = torch.stack([torch.empty(len(positions), V).exponential_(generator=torch.Generator().manual_seed(s))
                         for s in seeds])                                   # (16, F, V)
    ref = tokens.repeat(16, 1)
    with torch.no_grad():
        for k, i in enumerate(positions):
            ref[:, i] = (F.softmax(model(ref)[:, i], dim=-1) / noise[:, k]).argmax(-1)
    assert torch.equal(a, ref)


def test_heal_draws_do_not_depend_on_the_batch(monkeypatch):
    model = make_model(n_layer=3)
    tokens, flagged = flagged_example()
    sizes = []
    new_cache = model._new_cache
    monkeypatch.setattr(model, "_new_cache", lambda batch, length: sizes.append(batch) or new_cache(batch, length))
    healed = {b: model.heal(tokens, flagged, 7, generator=torch.Generator().manual_seed(5), batch=b)
              for b in (1, 3, 7)}
    assert sizes == [1] * 7 + [3, 3, 1] + [7]  # the batches really were healed apart
    assert torch.equal(healed[1], healed[7]) and torch.equal(healed[3], healed[7])
    assert (healed[7][:, ~flagged] == tokens[~flagged]).all()
    assert len({tuple(row.tolist()) for row in healed[7]}) > 1  # the sequences differ from each other
    # The first sequences of a larger draw are the same draw.
    more = model.heal(tokens, flagged, 9, generator=torch.Generator().manual_seed(5), batch=2)
    assert torch.equal(more[:7], healed[7])


def test_heal_in_short_teacher_forced_pieces_makes_the_same_draws(monkeypatch):
    model = make_model()
    tokens, flagged = flagged_example()
    whole = model.heal(tokens, flagged, 5, generator=torch.Generator().manual_seed(7))
    calls = []
    decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda inputs, start=0, cache=None, key_masked=None:
                        calls.append(inputs.shape[1]) or decode(inputs, start, cache, key_masked))
    monkeypatch.setattr(transformer_mod, "TEACHER_FORCED_PIECE", 2)
    pieces = model.heal(tokens, flagged, 5, generator=torch.Generator().manual_seed(7))
    assert max(calls) == 2 and sum(calls) == 20  # the prefill of 6 tokens and the runs to 19 went in pieces
    assert torch.equal(pieces, whole)


def long_runs_example():
    """Flags after runs longer than the largest static bucket (made 4 in the tests that use this), single flags
    next to each other, and a flag at the last position."""
    tokens = random_tokens(1, 21)[0]
    flagged = torch.zeros(L, dtype=torch.bool)
    flagged[[9, 10, 11, 16, 22, 23]] = True
    return tokens, flagged


@pytest.mark.parametrize("batch", [None, 3])
def test_static_steps_make_the_eager_draws(monkeypatch, batch):
    monkeypatch.setattr(transformer_mod, "STATIC_BUCKETS", (1, 2, 4))
    model = make_model(n_layer=3)
    widths = []
    static_draw = model._static_draw
    monkeypatch.setattr(model, "_static_draw",
                        lambda inputs, *a: widths.append(inputs.shape[1]) or static_draw(inputs, *a))
    for tokens, flagged in (flagged_example(), long_runs_example()):
        eager = model.heal(tokens, flagged, 7, generator=torch.Generator().manual_seed(8), batch=batch)
        static = model.heal(tokens, flagged, 7, generator=torch.Generator().manual_seed(8), batch=batch,
                            steps="static")
        assert torch.equal(static, eager)
        assert (static[:, ~flagged] == tokens[~flagged]).all()
    # The runs of 10 tokens before position 9 and of 6 before 16 and 22 went eager (longer than a bucket); the
    # others were padded to buckets 1, 2 or 4.
    assert set(widths) <= {1, 2, 4} and widths
    # One set kept for the next scan; batches of 3, 3 and 1 shared it (the last in its first row).
    (key, kept), = model._static_kept.items()
    assert key[0] == (7 if batch is None else 3) and kept.inputs.shape[0] == key[0]


def test_static_steps_pad_and_reuse_their_cache_across_scans(monkeypatch):
    monkeypatch.setattr(transformer_mod, "STATIC_BUCKETS", (1, 8))
    model = make_model()
    # Caches start as whatever memory held: NaN here. Eager calls never read past what they wrote; static ones
    # attend over the whole cache, so theirs must be made finite.
    new_cache = model._new_cache
    monkeypatch.setattr(model, "_new_cache", lambda batch, length: [tuple(t.fill_(float("nan")) for t in kv)
                                                                     for kv in new_cache(batch, length)])
    for seed in (30, 31, 32):  # each scan reuses the cache the one before filled (and padded past its flags)
        tokens = random_tokens(1, seed)[0]
        flagged = torch.rand(L, generator=torch.Generator().manual_seed(seed)) < 0.4
        flagged[-1] = True
        eager = model.heal(tokens, flagged, 5, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(model.heal(tokens, flagged, 5, generator=torch.Generator().manual_seed(seed),
                                      steps="static"), eager)
    assert len(model._static_kept) == 1


def test_kept_static_steps_go_with_their_model():
    """The steps a model keeps (its cache, on CUDA its graphs) are freed with it, without waiting for the cycle
    collector: training drops each iteration's fold Transformers, and their GPU memory must go with them."""
    import gc
    import weakref

    model = make_model()
    tokens, flagged = flagged_example()
    model.heal(tokens, flagged, 3, steps="static")
    kept = weakref.ref(next(iter(model._static_kept.values())))
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None and kept() is None
    finally:
        gc.enable()


def test_heal_steps_default_and_memory():
    model = make_model()
    assert model.heal_steps() == "eager"  # a CPU model
    with pytest.raises(ValueError, match="steps='fast'"):
        model.heal_steps("fast")
    tokens, flagged = flagged_example()
    with pytest.raises(ValueError):
        model.heal(tokens, flagged, 2, steps="fast")
    # Static steps keep the whole sequence and a bucket more in the cache; eager ones stop at the last flag (19).
    eager, static = model.heal_bytes(flagged), model.heal_bytes(flagged, "static")
    per_position = 2 * model.cfg.n_layer * model.cfg.n_embd * 4
    noise = 4 * V  # a flagged token's noise
    piece = 4 * (8 * model.cfg.n_embd + V)  # a teacher-forced token's activations
    assert eager == per_position * 20 + noise * 5 + piece * 20
    # Static steps count the worst case of any scan, so every scan gets the same batch.
    keys = transformer_mod.static_cache_length(L)
    assert keys == 96 and keys >= L + transformer_mod.STATIC_BUCKETS[-1]  # 88 rounded up to a multiple of 16
    assert static == per_position * keys + noise * L + piece * keys
    assert model.heal_bytes(flagged.roll(-3), "static") == static


@pytest.mark.parametrize("error", [RuntimeError, TypeError])  # CUDA's errors; a torch whose graph API is older
def test_graphs_that_cannot_be_captured_fall_back_to_eager_steps(monkeypatch, error):
    model = make_model()
    tokens, flagged = flagged_example()
    eager = model.heal(tokens, flagged, 4, generator=torch.Generator().manual_seed(9))

    def fail(self, model):
        raise error("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(transformer_mod.StaticSteps, "_capture", fail)
    made = []
    monkeypatch.setattr(model, "_static_draw", lambda *a: made.append(a))
    with pytest.warns(UserWarning, match="healing runs eagerly: CUDA graphs of its model calls failed \\(CUDA error"):
        healed = model.heal(tokens, flagged, 4, generator=torch.Generator().manual_seed(9), steps="graphs")
    assert torch.equal(healed, eager) and not made
    assert model._graphs_failed and not model._static_kept
    assert model.heal_steps("graphs") == "eager"  # not tried again on this model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_graphs_make_the_eager_draws(precision):
    from iltm.precision import autocast

    model = make_model(n_layer=3).cuda()
    tokens, flagged = long_runs_example()
    tokens, flagged = tokens.cuda(), flagged.cuda()
    runs = {}
    with autocast(precision, torch.device("cuda")):
        for steps in ("eager", "static", "graphs", None, "again"):
            runs[steps] = model.heal(tokens, flagged, 64, generator=torch.Generator("cuda").manual_seed(2), batch=24,
                                     steps="graphs" if steps == "again" else steps)
    assert model.heal_steps() == "graphs" and not model._graphs_failed
    (key, kept), = model._static_kept.items()
    assert key[2] == "graphs" and set(kept.graphs) == set(transformer_mod.STATIC_BUCKETS)
    assert torch.equal(runs["graphs"], runs[None]) and torch.equal(runs["graphs"], runs["again"])  # replays repeat
    assert torch.equal(runs["graphs"], runs["static"])  # a replay computes what the captured call computes
    differ = (runs["graphs"] != runs["eager"]).float().mean().item()
    # The static calls attend over the whole cache (another kernel, another order of sums): the same draws in
    # float32; in bfloat16 a near tie between two codes may go the other way.
    assert differ == 0 if precision == "float32" else differ < 0.02, differ


def test_heal_draws_follow_the_model_probabilities():
    model = make_model()
    tokens = random_tokens(1, 15)[0]
    i, samples = 9, 6000
    flagged = torch.zeros(L, dtype=torch.bool)
    flagged[i] = True
    healed = model.heal(tokens, flagged, samples, generator=torch.Generator().manual_seed(6), batch=1000)
    with torch.no_grad():
        p = F.softmax(model(tokens[None])[0, i].double(), dim=-1)          # (V,) p(. | the kept prefix)
    assert float(p.max()) < 0.6 and int((p > 0.02).sum()) >= 4         # a spread to compare, not one code
    freq = torch.bincount(healed[:, i], minlength=V).double() / samples
    sigma = (p * (1 - p) / samples).sqrt()
    assert bool(((freq - p).abs() <= 4 * sigma + 1e-3).all()), (freq, p)


def test_a_forward_without_masks_builds_no_attention_mask(monkeypatch):
    model = make_model()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(random_tokens(2, 16))
    assert seen == [(True, True)] * 2  # per layer: SDPA's causal flag, no (T, T) mask
    seen.clear()
    with torch.no_grad():
        model(random_tokens(2, 16), random_masks(4, 0)[:2])
    assert seen == [(False, True)] * 2  # masked keys: the causal flag with a (B, 1, 1, K) bias


def test_heal_uses_a_bounded_number_of_model_calls(monkeypatch):
    model = make_model()
    tokens, flagged = flagged_example()
    first, last = 5, 19
    calls = []
    decode = model._decode

    def counting(inputs, start=0, cache=None, key_masked=None):
        calls.append((start, inputs.shape[1]))
        return decode(inputs, start, cache, key_masked)

    monkeypatch.setattr(model, "_decode", counting)
    model.heal(tokens, flagged, samples=8)
    assert 1 <= len(calls) <= L - first + 1
    # Every position up to the last flagged one is processed exactly once, in order; nothing after it.
    assert calls[0][0] == 0
    assert all(s + n == s_next for (s, n), (s_next, _) in zip(calls, calls[1:]))
    assert calls[-1][0] + calls[-1][1] == last + 1


def test_dropout_only_in_training():
    model = make_model(dropout=0.5)
    tokens = random_tokens(2, 15)
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


def test_save_load_round_trip(tmp_path):
    model = make_model()
    path = tmp_path / "run" / "transformer.pt"
    model.save(path, extra={"iteration": 2, "threshold": 0.004})
    assert [p.name for p in path.parent.iterdir()] == ["transformer.pt"]  # no temporary file left behind
    loaded = TokenTransformer.load(path, map_location="cpu").eval()
    assert loaded.cfg == model.cfg and loaded.num_codes == V and loaded.seq_len == L
    assert loaded.extra == {"iteration": 2, "threshold": 0.004}
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(InputError, match="missing"):
        TokenTransformer.load(tmp_path / "nope.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="not a readable"):
        TokenTransformer.load(garbage)

    good = tmp_path / "good.pt"
    make_model().save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="not a readable"):
        TokenTransformer.load(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(InputError, match="not an iltm-transformer Transformer"):
        TokenTransformer.load(foreign)

    ckpt = torch.load(good, weights_only=True)
    ckpt["version"] = CHECKPOINT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(ckpt, newer)
    with pytest.raises(InputError, match="incompatible version") as info:
        TokenTransformer.load(newer)
    assert info.value.where == str(newer)

    ckpt = torch.load(good, weights_only=True)
    ckpt["seq_len"] = L + 1
    damaged = tmp_path / "damaged.pt"
    torch.save(ckpt, damaged)
    with pytest.raises(InputError, match="damaged"):
        TokenTransformer.load(damaged)


def test_a_masked_forward_under_bfloat16_autocast_hands_attention_a_mask_in_the_querys_dtype(monkeypatch):
    # CUDA's fused kernels take a float mask only in the query's dtype (bfloat16 under autocast).
    model = make_model()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.dtype, attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(random_tokens(2, 16), random_masks(4, 0)[:2])
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2


def dense_mask_only(monkeypatch):
    """Make every masked pass hand attention the dense (B, 1, T, K) mask, as on a device without the fused pair."""
    monkeypatch.setattr(transformer_mod, "fused_key_bias_on_cpu", lambda: False)


@pytest.mark.parametrize("training", [False, True])
def test_the_causal_key_bias_gives_the_dense_masks_logits_and_gradients(monkeypatch, training):
    # The masked training step (and masked likelihoods) combine the kernel's causal mask with a (B, 1, 1, K) bias
    # instead of a (B, 1, T, K) mask: the same attention, so the same loss and gradients.
    assert transformer_mod.fused_key_bias_on_cpu(), "this torch's fused CPU attention should take the pair"
    tokens, mask = random_tokens(6, 21), random_masks(6, 22)
    model = make_model(5).train(training)
    kinds = []
    original = transformer_mod.TokenTransformer._attention_mask

    def spy(*args, **kw):
        kinds.append(type(original(*args, **kw)).__name__)
        return original(*args, **kw)

    monkeypatch.setattr(transformer_mod.TokenTransformer, "_attention_mask", staticmethod(spy))

    def step():
        model.zero_grad(set_to_none=True)
        value = loss(model, tokens, mask)
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()]

    fused_loss, fused_grads = step()
    dense_mask_only(monkeypatch)
    dense_loss, dense_grads = step()
    assert kinds == ["CausalKeyBias", "Tensor"]
    torch.testing.assert_close(fused_loss, dense_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Sanity: the masks matter, so a bias that ignored them would fail above.
    model.zero_grad(set_to_none=True)
    assert not torch.allclose(loss(model, tokens, None), dense_loss, atol=1e-4)


def test_attention_dropout_in_training_takes_the_dense_mask():
    # Dropout sends attention to its unfused path, which refuses a causal mask paired with a bias.
    model = make_model(dropout=0.2).train()
    value = loss(model, random_tokens(4, 23), random_masks(4, 24))
    value.backward()
    assert torch.isfinite(value)
