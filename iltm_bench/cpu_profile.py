"""Where a CPU training run's time goes, stage by stage, and what the CPU speedups cut: old and new path side by side.

    python -m iltm_bench.cpu_profile [--size 48 56 48] [--n-train 40] [--preset tiny] [--flagged 0.1]
        [--masked 0.05] [--rounds 2] [--threads 0]

On random inputs of the preset's real shapes it times, in one process, each stage of one ILTM training run: a
VQ-VAE optimiser step (with the batch's augmentation), a Transformer optimiser step without masks (iteration 0) and
with ``--masked`` of the tokens masked (later iterations), and the parts of one training-scan detection (encoding,
likelihood, healing ``--flagged`` of the tokens, the S x D dropout decodes, the KDE). Every stage runs the reference
path (the code before the speedups, kept here only) and the new one (the package's) alternately, ``--rounds``
times after a warm-up, and keeps each one's fastest round: other work on the cores slows single rounds, not the
best one. The per-call seconds are then multiplied by the preset's step counts for ``--n-train`` scans (the VQ-VAE's
from ``vqvae.min_steps`` and ``max_steps``, the cross-fitting folds, ``max_iterations + 1`` iterations without an early
stop) into minutes of one run and each stage's share of it.

The reference paths: attention always reads a bool (T, K) mask (converted to float in every layer, forward and
backward), where the package now takes the fused kernel's own causal mask when no key is masked, that mask with a
(B, 1, 1, K) bias of the masked keys in a training pass with masks, and a float mask built once per pass otherwise
(healing's teacher-forced runs); healing runs on torch's default intra-op threads, where the package runs it on one.
Untouched stages run the same code in both columns. The reference run fits every iteration's full-cohort
Transformer, and where the preset caps the VQ-VAE's steps (``vqvae.max_steps``) it trains it as before, for all its
epochs in batches made smaller for 2400 steps (:func:`reference_config`); the new one as the preset says
(``iltm.full_transformers=used``: only the last iteration's full model), so the "calls" column shows both counts
where they differ.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from datetime import datetime, timezone

import torch

from iltm.config import preset
from iltm.detect import Detector, one_cpu_thread
from iltm.kde import log_density
from iltm.preprocess import augmentation
from iltm.train import fold_of, vqvae_loss, vqvae_schedule
from iltm.transformer import TokenTransformer, masked_cross_entropy
from iltm.vqvae import build_vqvae, encode_tokens


class ReferenceTransformer(TokenTransformer):
    """The Transformer as it was before the CPU speedups: every pass hands each layer a bool mask."""

    @staticmethod
    def _attention_mask(start, T, key_masked=None, device=None, key_bias=False):
        q_pos = torch.arange(start, start + T, device=device)
        k_pos = torch.arange(start + T, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, K) causal
        if key_masked is not None:
            allowed = allowed & ~key_masked[:, None, None, :]  # (B, 1, T, K)
        return allowed


def reference_copy(model: TokenTransformer) -> ReferenceTransformer:
    """A :class:`ReferenceTransformer` with ``model``'s weights and mode."""
    ref = ReferenceTransformer(model.cfg, model.num_codes, model.seq_len)
    ref.load_state_dict(model.state_dict())
    return ref.train(model.training)


def new_heal(model: TokenTransformer, tokens, flagged, samples, generator=None):
    """Healing as ``Detector.detect_array`` runs it now."""
    with one_cpu_thread(torch.device("cpu")):
        return model.heal(tokens, flagged, samples, generator=generator)


def transformer_step(model: TokenTransformer, tokens, token_mask):
    """One forward and backward pass of the training loss; returns (loss, gradients)."""
    model.zero_grad(set_to_none=True)
    loss = masked_cross_entropy(model(tokens, token_mask), tokens, token_mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def fastest(paths: dict, rounds: int) -> dict[str, float]:
    """Seconds of each callable's fastest round; the callables alternate, after one warm-up call each."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def epoch_batches(n: int, batch: int) -> list[int]:
    """Batch sizes of one epoch over n scans (``train.shuffled_batches`` on one process)."""
    return [batch] * (n // batch) + ([n % batch] if n % batch else [])


def reference_config(cfg):
    """``cfg`` as the run was before the CPU cuts: every iteration's full-cohort Transformer fitted, and a VQ-VAE
    capped by ``vqvae.max_steps`` trained instead for all its epochs, in batches of up to 8 made smaller for 2400
    steps (the rule ``tiny`` had in 3D), and as many ILTM iterations in 3D as in 2D (``tiny`` had 3 in both)."""
    ref = copy.deepcopy(cfg)
    ref.iltm.full_transformers = "every"
    ref.iltm.max_iterations = ref.iltm.iterations_for(2)
    if ref.vqvae.max_steps_for(3):
        ref.vqvae.max_steps, ref.vqvae.batch_size, ref.vqvae.min_steps = 0, 8, 2400
    return ref


def run_calls(cfg, n: int, every_full: bool | None = None) -> dict[str, float]:
    """Calls per run, each counted in units of the timed call (steps scaled by their batch's share of a full one).

    ``every_full``: every iteration fits its full-cohort Transformer (the reference), else only the last one does,
    after the loop (``iltm.full_transformers=used`` with ``select_iteration=last``); None: as the preset says.
    """
    if every_full is None:
        every_full = cfg.iltm.fits_every_transformer()
    vq_batch, vq_epochs = vqvae_schedule(n, cfg.vqvae, 3)
    vq_steps = vq_epochs * sum(b / vq_batch for b in epoch_batches(n, vq_batch))
    t_batch, folds = cfg.transformer.batch_size, cfg.iltm.cross_fit_folds

    def steps(m: int) -> float:
        return cfg.transformer.epochs * sum(b / t_batch for b in epoch_batches(m, t_batch))

    full, fold_fits = steps(n), sum(steps(sum(1 for i in range(n) if fold_of(i, folds) != j)) for j in range(folds))
    iterations = cfg.iltm.iterations_for(3) + 1
    unmasked = fold_fits + (full if every_full or iterations == 1 else 0.0)
    masked = (iterations - 1) * fold_fits + (full * (iterations - 1) if every_full else full * (iterations > 1))
    return {"vq_batch": vq_batch, "vqvae": vq_steps, "unmasked": unmasked, "masked": masked,
            "detect": n * iterations, "iterations": iterations, "fits": folds + 1,
            "full_fits": iterations if every_full else 1}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[48, 56, 48], help="3D scan size in voxels (x y z)")
    p.add_argument("--n-train", type=int, default=40, help="training scans of the run extrapolated to")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--flagged", type=float, default=0.1, help="share of tokens healed per detection")
    p.add_argument("--masked", type=float, default=0.05, help="share of tokens masked in the masked iterations")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per path after a warm-up (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if len(args.size) != 3:
        p.error(f"--size needs 3 numbers, got {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    cfg.data.spatial_dims = 3
    det = cfg.detection
    calls = run_calls(cfg, args.n_train)
    ref_calls = run_calls(reference_config(cfg), args.n_train)
    shape = tuple(reversed(args.size))                                   # numpy order (z, y, x)
    latent = tuple(s // cfg.vqvae.downsample_factor for s in shape)
    length = math.prod(latent)
    torch.manual_seed(0)
    rows = []  # (stage, reference s, new s, key of the calls per run)

    # VQ-VAE: a step with its augmentation at each column's batch (the same when the schedule did not change).
    vqvae = build_vqvae(cfg.vqvae, 3).train()
    vq_opt = torch.optim.AdamW(vqvae.parameters(), lr=cfg.vqvae.learning_rate)
    augment = augmentation(cfg.data, 3, seed=0)
    scans = [torch.rand(1, *shape) for _ in range(max(calls["vq_batch"], ref_calls["vq_batch"]))]

    def vq_step(batch: int):
        x = torch.stack([torch.as_tensor(augment(s)) for s in scans[:batch]]).float()
        loss = vqvae_loss(vqvae, x)
        vq_opt.zero_grad(set_to_none=True)
        loss.backward()
        vq_opt.step()

    batches = (ref_calls["vq_batch"], calls["vq_batch"])
    t = fastest({"ref": lambda: vq_step(batches[0]), "new": lambda: vq_step(batches[1])}, args.rounds)
    label = f"batch {batches[0]}" if batches[0] == batches[1] else f"batch {batches[0]} -> {batches[1]}"
    rows.append((f"VQ-VAE step ({label}, augmented)", t["ref"], t["new"], "vqvae"))

    # Transformer steps, reference and new on the same weights and batch.
    codes = cfg.vqvae.num_embeddings
    model = TokenTransformer(cfg.transformer, codes, length).train()
    reference = reference_copy(model)
    tokens = torch.randint(0, codes, (cfg.transformer.batch_size, length))
    mask = torch.rand(tokens.shape) < args.masked
    for label, m, key in (("unmasked (iteration 0)", None, "unmasked"),
                          (f"{args.masked:.0%} masked (later iterations)", mask, "masked")):
        t = fastest({"ref": lambda: transformer_step(reference, tokens, m),
                     "new": lambda: transformer_step(model, tokens, m)}, args.rounds)
        rows.append((f"Transformer step, {label}, batch {cfg.transformer.batch_size}", t["ref"], t["new"], key))

    # One training-scan detection, stage by stage.
    model.eval()
    detector = Detector(cfg, vqvae, model, latent, torch.device("cpu"))
    image = torch.rand(1, 1, *shape)
    one = encode_tokens(detector.vqvae, image).reshape(-1)
    flagged = torch.rand(length, generator=torch.Generator().manual_seed(1)) < args.flagged  # whatever ran before
    n = det.samples * det.dropout_passes
    with torch.no_grad():
        t = fastest({"enc": lambda: encode_tokens(detector.vqvae, image)}, args.rounds)["enc"]
        rows.append(("detection: encoding", t, t, "detect"))
        ref_model = reference_copy(model)
        t = fastest({"ref": lambda: ref_model.token_probabilities(one[None]),
                     "new": lambda: model.token_probabilities(one[None])}, args.rounds)
        rows.append(("detection: likelihood", t["ref"], t["new"], "detect"))
        t = fastest({"ref": lambda: ref_model.heal(one, flagged, det.samples),
                     "new": lambda: new_heal(model, one, flagged, det.samples)}, args.rounds)
        rows.append((f"detection: healing {int(flagged.sum())} tokens x S={det.samples}", t["ref"], t["new"],
                     "detect"))
        latents = one.reshape(1, *latent).repeat(n, *[1] * len(latent))
        parts: list = []
        t = fastest({"dec": lambda: (parts.clear(), detector.decode_batches(latents, 0, det.decode_batch,
                                                                            parts.append))}, args.rounds)["dec"]
        rows.append((f"detection: decoding N={n}", t, t, "detect"))
        recon = torch.cat(parts)
        t = fastest({"kde": lambda: log_density(recon, image[0, 0], cfg.eps(), det.kde_chunk_voxels)},
                    args.rounds)["kde"]
        rows.append(("detection: KDE", t, t, "detect"))

    total_ref = sum(r[1] * ref_calls[r[3]] for r in rows)
    total_new = sum(r[2] * calls[r[3]] for r in rows)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end; fastest of "
          f"{args.rounds} alternating rounds after a warm-up")
    print(f"# preset {args.preset}, scans {'x'.join(map(str, args.size))} ({math.prod(shape)} voxels), tokens "
          f"{'x'.join(map(str, latent))} = {length}; run of {args.n_train} scans: {calls['iterations']} iterations, "
          f"{calls['fits']} Transformer fits each (the full-cohort one: reference every iteration, new "
          f"{'every iteration' if calls['full_fits'] == calls['iterations'] else 'the last one only'}), detections "
          f"healing {args.flagged:.0%} of the tokens, later "
          f"iterations masking {args.masked:.0%}")
    print(f"{'stage':58}{'ref s':>9}{'new s':>9}{'ratio':>7}{'calls':>13}{'ref min':>9}{'new min':>9}"
          f"{'ref %':>7}{'new %':>7}")
    for stage, ref, new, key in rows:
        before, now = ref_calls[key], calls[key]
        counts = f"{now:.0f}" if before == now else f"{before:.0f}->{now:.0f}"
        print(f"{stage:58}{ref:9.3f}{new:9.3f}{ref / new:7.2f}{counts:>13}{ref * before / 60:9.1f}"
              f"{new * now / 60:9.1f}{100 * ref * before / total_ref:7.1f}{100 * new * now / total_new:7.1f}")
    det_ref = sum(r[1] for r in rows if r[0].startswith("detection"))
    det_new = sum(r[2] for r in rows if r[0].startswith("detection"))
    print(f"{'one detection (sum of its stages)':58}{det_ref:9.3f}{det_new:9.3f}{det_ref / det_new:7.2f}")
    print(f"{'run (training with its detections)':58}{'':9}{'':9}{total_ref / total_new:7.2f}{'':8}"
          f"{total_ref / 60:9.1f}{total_new / 60:9.1f}")


if __name__ == "__main__":
    main()
