"""Detection's stages side by side: time and peak memory of the old and new paths, in float32 and bfloat16, for one
or more S, in one process.

    python -m iltm_bench.detect_scale [--dims 2] [--size 256 256] [--preset paper] [--samples S [S ...]]
        [--passes D] [--columns new-float32 old-float32 eager-bfloat16 new-bfloat16] [--device cpu]
        [--flagged-share 0.05] [--no-decoding]

The models are freshly initialised at the preset's shapes (timings and memory do not depend on training); the scan is
random. Resampling heals a fixed share of the tokens (``--flagged-share``: a trained model at the paper's t flags a
few per cent), so the sequential Transformer steps are what a real scan costs. Stages: encode (VQ-VAE encoder and
codebook), likelihood (one Transformer pass), resampling (healing S sequences), decoding (S x D dropout decodes;
twice when streamed) and KDE. Encode and likelihood do not depend on the path or S: they run once per precision and
every column of that precision shows them. The old path is what detection did before memory was bounded: all S
sequences healed in one batch (one KV cache for all of them), and the N reconstructions held in memory, decoded
``decode_batch`` at a time. The new one is ``Detector``'s: healing in batches of ``heal_batch`` sequences (on CUDA
with its model calls replayed from CUDA graphs, whose one-time capture is the stage "capture"), decoder batches of
``decoder_batch``, the KDE streamed when ``streams`` says so. The eager path is the new one with healing's model
calls run eagerly, as before the CUDA graphs (on a CPU the new path is eager too). ``--no-decoding`` stops after
resampling (at a whole-body grid a paper decode takes minutes on a CPU, and decoding's memory does not depend on N:
its batch is bounded). Streamed, decoding and KDE interleave batch by batch, so they share one peak. Memory is the
process's peak resident set during the stage (Linux: VmHWM, reset before each stage through /proc/self/clear_refs),
so it includes the models and everything held from earlier stages (and what the allocator kept from earlier columns:
put the columns to compare first); on CUDA it is torch's peak allocated device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from iltm import kde
from iltm.config import preset
from iltm.detect import Detector
from iltm.transformer import TokenTransformer
from iltm.vqvae import build_vqvae, encode_tokens


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stages:
    """Seconds and peak MB per stage; a stage may be entered several times (its seconds add up)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak = device, {}, {}

    def run(self, name: str, fn):
        reset_peak(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.peak[name] = max(self.peak.get(name, 0.0), peak_mb(self.device))
        return out


def measure(detector: Detector, image: torch.Tensor, column: str, samples: int, flagged_share: float,
            shared: dict, decoding: bool = True) -> Stages:
    path, precision = column.split("-")
    detector.cfg = dataclasses.replace(detector.cfg, precision=precision)
    detector.cfg = dataclasses.replace(detector.cfg, detection=dataclasses.replace(detector.cfg.detection,
                                                                                   samples=samples))
    det = detector.cfg.detection
    st = Stages(detector.device)
    x = image.to(detector.device)[None]
    with torch.no_grad():
        if precision not in shared:  # encode and likelihood: once per precision
            tokens = st.run("encode", lambda: encode_tokens(detector.vqvae, x).reshape(-1))
            with detector.autocast():
                probs = st.run("likelihood", lambda: detector.transformer.token_probabilities(tokens[None])[0])
            shared[precision] = (tokens, probs, st)
        tokens, probs, first = shared[precision]
        for stage in ("encode", "likelihood"):
            st.seconds[stage], st.peak[stage] = first.seconds[stage], first.peak[stage]
        flagged = torch.zeros_like(tokens, dtype=torch.bool)
        flagged[probs.argsort()[: max(1, int(flagged_share * tokens.numel()))]] = True
        gen = torch.Generator(device=detector.device).manual_seed(0)
        steps = detector.transformer.heal_steps("eager" if path in ("old", "eager") else None)
        with detector.autocast():
            batch = det.samples if path == "old" else detector.heal_batch(flagged, steps)
            if steps != "eager":  # once per process: what a cohort's first scan pays
                st.run("capture", lambda: detector.transformer._static_steps(batch, 1.0, steps))
            healed = st.run("resampling", lambda: detector.transformer.heal(tokens, flagged, det.samples, gen,
                                                                            batch=batch, steps=steps))
        st.heal_batch = batch
        if not decoding:
            return st
        latents = healed.reshape(det.samples, *detector.latent_shape).repeat_interleave(det.dropout_passes, dim=0)
        voxels = x[0, 0].numel()
        if path == "old" or not detector.streams(latents.shape[0], voxels):
            parts = []
            batch = det.decode_batch if path == "old" else detector.decoder_batch(voxels)
            st.run("decoding", lambda: detector.decode_batches(latents, 1, batch, parts.append))
            recon = torch.cat(parts)
            st.run("KDE", lambda: kde.log_density(recon, x[0, 0], detector.cfg.eps(),
                                                   chunk_voxels=det.kde_chunk_voxels))
            del recon, parts
        else:
            batch = detector.decoder_batch(voxels)
            estimate = kde.StreamedLogDensity(x[0, 0], detector.cfg.eps(), chunk_voxels=det.kde_chunk_voxels)
            for accumulate in (estimate.add_moments, estimate.add_kernels):
                kde_seconds = [0.0]

                def visit(b, accumulate=accumulate, kde_seconds=kde_seconds):
                    start = time.perf_counter()
                    accumulate(b)
                    kde_seconds[0] += time.perf_counter() - start

                # Decoding and KDE interleave batch by batch: one peak for both, the KDE's seconds split off.
                st.run("decoding", lambda: detector.decode_batches(latents, 1, batch, visit))
                st.seconds["decoding"] -= kde_seconds[0]
                st.seconds["KDE"] = st.seconds.get("KDE", 0.0) + kde_seconds[0]
                st.peak["KDE"] = st.peak["decoding"]
            estimate.result()
        st.decode_batch = batch
    return st


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--size", type=int, nargs="+", default=None, help="grid (z-)y-x order; default 256^dims")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="S, one or more (default the preset's); a column per path, precision and S")
    parser.add_argument("--passes", type=int, default=None, help="D (default the preset's)")
    parser.add_argument("--columns", nargs="+", default=["new-float32", "old-float32", "new-bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flagged-share", type=float, default=0.05)
    parser.add_argument("--no-decoding", action="store_true", help="stop after resampling")
    args = parser.parse_args(argv)
    cfg = preset(args.preset)
    size = tuple(args.size or [256] * args.dims)
    samples = args.samples or [cfg.detection.samples]
    det = dataclasses.replace(cfg.detection, dropout_passes=args.passes or cfg.detection.dropout_passes)
    cfg = dataclasses.replace(cfg, detection=det)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vqvae = build_vqvae(cfg.vqvae, args.dims)
    latent = tuple(s // cfg.vqvae.downsample_factor for s in size)
    tokens = int(torch.tensor(latent).prod())
    transformer = TokenTransformer(cfg.transformer, cfg.vqvae.num_embeddings, tokens)
    detector = Detector(cfg, vqvae, transformer, latent, device)
    image = torch.rand(1, *size)
    voxels = int(torch.tensor(size).prod())
    flagged = max(1, int(args.flagged_share * tokens))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} CPU"
          f", torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"# preset {args.preset}, grid {'x'.join(map(str, size))} ({args.dims}D), tokens {'x'.join(map(str, latent))}"
          f" = {tokens}, S={'/'.join(map(str, samples))}, D={det.dropout_passes}, flagged {flagged} "
          f"({args.flagged_share:.1%}); budget (detection.stream_above_mb) {det.stream_above_mb:.0f} MB; decoder batch "
          f"{detector.decoder_batch(voxels)} (old path {det.decode_batch}), one reconstruction "
          f"{Detector.reconstruction_bytes(1, voxels) / 2 ** 20:.0f} MB")
    columns = [(c, s) for s in samples for c in args.columns]
    shared: dict = {}
    results = {}
    for c, s in columns:
        results[c, s] = measure(detector, image, c, s, args.flagged_share, shared, not args.no_decoding)
        print(f"# {c} S={s} done: " + ", ".join(f"{stage} {results[c, s].seconds[stage]:.1f} s "
                                                 f"{results[c, s].peak[stage]:.0f} MB" for stage in results[c, s].peak),
              flush=True)
    stages = ["encode", "likelihood", "resampling"] + ([] if args.no_decoding else ["decoding", "KDE"])
    if any("capture" in r.seconds for r in results.values()):
        stages.insert(2, "capture")
        for r in results.values():
            r.seconds.setdefault("capture", 0.0)
            r.peak.setdefault("capture", 0.0)
    names = [f"{c} S={s}" for c, s in columns]
    print(f"{'stage':<12}" + "".join(f"{n + ' s':>22}{n + ' MB':>22}" for n in names))
    for stage in stages:
        print(f"{stage:<12}" + "".join(f"{results[k].seconds[stage]:>22.2f}{results[k].peak[stage]:>22.0f}"
                                       for k in columns))
    print(f"{'total':<12}" + "".join(f"{sum(results[k].seconds.values()):>22.2f}{max(results[k].peak.values()):>22.0f}"
                                     for k in columns))
    print(f"{'heal batch':<12}" + "".join(f"{'':>22}{results[k].heal_batch:>22}" for k in columns))
    if not args.no_decoding:
        print(f"{'dec. batch':<12}" + "".join(f"{'':>22}{results[k].decode_batch:>22}" for k in columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
