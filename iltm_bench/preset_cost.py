"""What one ILTM run costs at each preset, measured side by side in one process.

    python -m iltm_bench.preset_cost [--dims 2] [--size 64 64] [--n-train 48] [--presets tiny small]
        [--devices cpu cuda] [--steps 5] [--history RUN/history.json]

For each preset it times, on random inputs of the sweep's shapes, a few optimiser steps of the VQ-VAE and of
the Transformer and one detection (heal a fixed share of tokens, decode S x D times, KDE), then multiplies by
the preset's epochs, batches, iterations, cross-fitting folds and training scans into the time of one ILTM run
(training, including the training-scan detections that make the masks). With several ``--devices`` every preset
is measured on each (columns ``preset@device``; ``cuda-bf16`` runs the CUDA steps under bfloat16 autocast). It
prints the stages and the ratio of every column to the first one. With ``--history`` (a finished run of the first
preset on the same data) it also prints that run's measured stage times, so the estimate can be checked against a
real run: the other columns' estimates are then scaled by measured / estimated of the first one.

Timings are of this machine at this moment; the ratios are what to read (every column runs in the same process,
one right after another, so load from other work hits them alike).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from iltm.config import preset
from iltm.detect import resolve_device
from iltm.errors import InputError
from iltm.kde import log_density
from iltm.synth import DEFAULT_SIZE
from iltm.train import vqvae_loss, vqvae_schedule
from iltm.transformer import TokenTransformer, masked_cross_entropy
from iltm.vqvae import build_vqvae, decode_tokens, encode_tokens, set_detection_mode

FLAGGED_SHARE = 0.05  # share of tokens resampled per detection (measured runs: 1-10 % at the tiny t)


def seconds_per_call(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Mean wall-clock seconds of ``fn()`` after one warm-up call; CUDA work is waited for before each reading."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocations, kernel choice)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def autocast(device: str):
    """(torch device, context for the forward passes): ``cuda-bf16`` = the CUDA device under bfloat16 autocast, a
    what-if for mixed precision (the package trains and detects in float32). A device that is not here raises
    ``InputError`` (``iltm.detect.resolve_device``)."""
    name = device.removesuffix("-bf16")
    dev = resolve_device(name)
    if name != device:
        return dev, lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    return dev, contextlib.nullcontext


def measure(name: str, dims: int, size: list[int], steps: int, device: str = "cpu") -> dict[str, float]:
    """Seconds of one VQ-VAE step, one Transformer step and one detection at preset ``name`` on ``device``."""
    cfg = preset(name)
    dev, precision = autocast(device)
    torch.manual_seed(0)
    vqvae = build_vqvae(cfg.vqvae, dims).to(dev)
    images = torch.rand(cfg.vqvae.batch_for(dims), 1, *size, device=dev)
    vq_opt = torch.optim.AdamW(vqvae.parameters(), lr=1e-4)

    def vq_step():
        with precision():
            loss = vqvae_loss(vqvae, images)
        vq_opt.zero_grad(set_to_none=True)
        loss.backward()
        vq_opt.step()

    vq = seconds_per_call(vq_step, steps, dev)
    vqvae.eval()
    with torch.no_grad():
        latent = encode_tokens(vqvae, images[:1]).shape[1:]
    length = math.prod(latent)
    codes = cfg.vqvae.num_embeddings
    transformer = TokenTransformer(cfg.transformer, num_codes=codes, seq_len=length).to(dev)
    tokens = torch.randint(0, codes, (cfg.transformer.batch_size, length), device=dev)
    t_opt = torch.optim.AdamW(transformer.parameters(), lr=1e-4)

    def t_step():
        with precision():
            loss = masked_cross_entropy(transformer(tokens), tokens, None)
        t_opt.zero_grad(set_to_none=True)
        loss.backward()
        t_opt.step()

    tf = seconds_per_call(t_step, steps, dev)
    transformer.eval()
    set_detection_mode(vqvae)
    det = cfg.detection
    generator = torch.Generator(device=dev).manual_seed(0)
    flagged = torch.rand(length, generator=generator, device=dev) < FLAGGED_SHARE

    # Detector.detect_array's steps, but with a fixed share of flagged tokens: an untrained Transformer's
    # probabilities (~1 / codes) fall under every preset's t, so detect_array would resample every token.
    @torch.no_grad()
    def detect():
        with precision():
            one = encode_tokens(vqvae, images[:1]).reshape(-1)
            transformer.token_probabilities(one[None])
            healed = transformer.heal(one, flagged, det.samples, generator=generator).reshape(det.samples, *latent)
            recon = decode_tokens(vqvae, healed.repeat_interleave(det.dropout_passes, dim=0), batch=det.decode_batch)
        log_density(recon[:, 0].float(), images[0, 0], cfg.eps(), chunk_voxels=det.kde_chunk_voxels)

    dt = seconds_per_call(detect, max(1, steps // 2), dev)
    return {"vqvae_step": vq, "transformer_step": tf, "detection": dt, "tokens": float(length)}


def run_estimate(name: str, per: dict[str, float], n_train: int, max_iterations: int | None = None,
                 dims: int = 2) -> dict[str, float]:
    """Seconds of one ILTM run's stages at preset ``name`` (the stage names of history.json) on ``dims``-D scans, with
    the preset's ``max_iterations`` unless given. VQ-VAE steps count as their share of the timed step's batch
    (``vqvae.batch_for``): a batch made smaller by ``min_steps`` costs its share."""
    cfg = preset(name)
    iterations = (cfg.iltm.iterations_for(dims) if max_iterations is None else max_iterations) + 1
    folds = cfg.iltm.cross_fit_folds
    _, vq_epochs = vqvae_schedule(n_train, cfg.vqvae, dims)
    vq_steps = vq_epochs * n_train / cfg.vqvae.batch_for(dims)
    t_steps = cfg.transformer.epochs * math.ceil(n_train / cfg.transformer.batch_size)
    # Fold j trains on the other folds' scans: folds x (folds - 1) / folds of the data in all.
    fold_steps = cfg.transformer.epochs * folds * math.ceil(n_train * (folds - 1) / folds / cfg.transformer.batch_size) \
        if folds > 1 else 0
    # The training scans are scored after every iteration (their maps make the next masks and the masks to browse).
    # With iltm.full_transformers=used the full-cohort Transformer is fitted once, for the iteration detection uses.
    full_fits = iterations if cfg.iltm.fits_every_transformer() else 1
    return {"vqvae": vq_steps * per["vqvae_step"],
            "transformer": full_fits * t_steps * per["transformer_step"],
            "folds": iterations * fold_steps * per["transformer_step"],
            "detect": iterations * n_train * per["detection"]}


def measured_stages(history: Path) -> dict[str, float]:
    h = json.loads(history.read_text(encoding="utf-8"))
    iters = h["iterations"]
    return {"vqvae": float(h["vqvae"]["seconds"]),
            "transformer": sum(float(r.get("train_seconds") or 0) for r in iters),
            "folds": sum(float(r.get("fold_train_seconds") or 0) for r in iters),
            "detect": sum(float(r.get("detect_seconds") or 0) for r in iters)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--size", type=int, nargs="+", help="image size in voxels (default: the synthetic default)")
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--devices", nargs="+", default=["cpu"], help="auto, cpu, cuda or cuda:N, each "
                   "with -bf16 for bfloat16 autocast (cuda-bf16); several are compared (default cpu)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--history", type=Path, help="history.json of a finished run of the first preset on the same data")
    p.add_argument("--max-iterations", type=int, help="ILTM iterations of the run estimated (default the preset's; "
                                                      "with --history, that run's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = list(args.size or DEFAULT_SIZE[args.dims])
    if len(size) != args.dims:
        p.error(f"--size needs {args.dims} numbers, got {size}")
    for device in args.devices:
        try:
            autocast(device)
        except InputError as exc:
            p.error(f"--devices: '{device}' is not available here ({exc.problem})")

    # One column per preset and device; a single device keeps the preset names as they are.
    columns = [(name, device) for name in args.presets for device in args.devices]
    label = {c: c[0] if len(args.devices) == 1 else f"{c[0]}@{c[1]}" for c in columns}
    per = {}
    for c in columns:  # each column's figures as soon as they are in: a large preset can take minutes
        per[label[c]] = measure(c[0], args.dims, size, args.steps, c[1])
        print(f"{label[c]}: " + ", ".join(f"{k} {v:.4g}" for k, v in per[label[c]].items()), file=sys.stderr,
              flush=True)
    iterations = args.max_iterations
    if args.history and iterations is None:
        iterations = len(json.loads(args.history.read_text(encoding="utf-8"))["iterations"]) - 1
    est = {label[c]: run_estimate(c[0], per[label[c]], args.n_train, iterations, args.dims) for c in columns}
    names = list(per)
    first = names[0]
    print(f"{args.dims}D, {'x'.join(map(str, size))} voxels, {args.n_train} training scans, "
          f"{torch.get_num_threads()} torch threads" +
          "".join(f", {d}: {torch.cuda.get_device_name(autocast(d)[0])}" for d in args.devices if d.startswith("cuda")))
    print("\nper call, seconds (ratio to " + first + ")")
    print(f"{'':18}" + "".join(f"{n:>22}" for n in names))
    for key in ("vqvae_step", "transformer_step", "detection"):
        cells = [f"{per[n][key]:10.4f} ({per[n][key] / per[first][key]:5.1f}x)" for n in names]
        print(f"{key:18}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'tokens per scan':18}" + "".join(f"{int(per[n]['tokens']):>22}" for n in names))

    scale = 1.0
    if args.history:
        measured = measured_stages(args.history)
        scale = sum(measured.values()) / max(sum(est[first].values()), 1e-9)
        print(f"\n{first} run measured in {args.history} ({iterations + 1} iterations), seconds measured / estimated "
              f"here: " + ", ".join(f"{k} {v:.0f} / {est[first][k]:.0f}" for k, v in measured.items()) +
              f"; total {sum(measured.values()):.0f} / {sum(est[first].values()):.0f} -> scale {scale:.2f}")
    print("\none ILTM run (training and its training-scan detections), minutes" +
          (f", scaled by {scale:.2f}" if args.history else ""))
    print(f"{'':18}" + "".join(f"{n:>22}" for n in names))
    for key in ("vqvae", "transformer", "folds", "detect"):
        print(f"{key:18}" + "".join(f"{scale * est[n][key] / 60:22.1f}" for n in names))
    totals = {n: sum(est[n].values()) for n in names}
    cells = [f"{scale * totals[n] / 60:.1f} ({totals[n] / totals[first]:.2g}x)" for n in names]
    print(f"{'total':18}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
