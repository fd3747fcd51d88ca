"""Detection's stages side by side: time and peak memory of the in-memory (old) and streamed (new) KDE paths, in
float32 and bfloat16, in one process.

    python -m iltm_bench.detect_scale [--dims 2] [--size 256 256] [--preset paper] [--samples S] [--passes D]
        [--columns old-float32 new-float32 new-bfloat16] [--device cpu] [--flagged-share 0.05]

The models are freshly initialised at the preset's shapes (timings and memory do not depend on training); the scan
is random. Resampling heals a fixed share of the tokens (``--flagged-share``: a trained model at the paper's t flags
a few per cent), so the sequential Transformer steps are what a real scan costs. Stages: encode (VQ-VAE encoder and
codebook), likelihood (one Transformer pass), resampling (healing S sequences), decoding (S x D dropout decodes; twice
when streamed) and KDE. Streamed, decoding and KDE
interleave batch by batch, so they share one peak. Memory is the process's peak resident set during the stage (Linux: VmHWM, reset before each
stage through /proc/self/clear_refs), so it includes the models and everything held from earlier stages; on CUDA it
is torch's peak allocated device memory.
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


def measure(detector: Detector, image: torch.Tensor, column: str, flagged_share: float) -> Stages:
    path, precision = column.split("-")
    detector.cfg = dataclasses.replace(detector.cfg, precision=precision)
    det = detector.cfg.detection
    st = Stages(detector.device)
    x = image.to(detector.device)[None]
    with torch.no_grad():
        tokens = st.run("encode", lambda: encode_tokens(detector.vqvae, x).reshape(-1))
        with detector.autocast():
            probs = st.run("likelihood", lambda: detector.transformer.token_probabilities(tokens[None])[0])
        flagged = torch.zeros_like(tokens, dtype=torch.bool)
        flagged[probs.argsort()[: max(1, int(flagged_share * tokens.numel()))]] = True
        gen = torch.Generator(device=detector.device).manual_seed(0)
        with detector.autocast():
            healed = st.run("resampling", lambda: detector.transformer.heal(tokens, flagged, det.samples, gen))
        latents = healed.reshape(det.samples, *detector.latent_shape).repeat_interleave(det.dropout_passes, dim=0)
        if path == "old":
            parts = []
            st.run("decoding", lambda: detector.decode_batches(latents, 1, det.decode_batch, parts.append))
            recon = torch.cat(parts)
            st.run("KDE", lambda: kde.log_density(recon, x[0, 0], detector.cfg.eps(),
                                                   chunk_voxels=det.kde_chunk_voxels))
            del recon, parts
        else:
            batch = detector.streamed_decode_batch(x[0, 0].numel())
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
    return st


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--size", type=int, nargs="+", default=None, help="grid (z-)y-x order; default 256^dims")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--samples", type=int, default=None, help="S (default the preset's)")
    parser.add_argument("--passes", type=int, default=None, help="D (default the preset's)")
    parser.add_argument("--columns", nargs="+", default=["old-float32", "new-float32", "new-bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flagged-share", type=float, default=0.05)
    args = parser.parse_args(argv)
    cfg = preset(args.preset)
    size = tuple(args.size or [256] * args.dims)
    det = dataclasses.replace(cfg.detection, samples=args.samples or cfg.detection.samples,
                              dropout_passes=args.passes or cfg.detection.dropout_passes)
    cfg = dataclasses.replace(cfg, detection=det)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vqvae = build_vqvae(cfg.vqvae, args.dims)
    latent = tuple(s // cfg.vqvae.downsample_factor for s in size)
    transformer = TokenTransformer(cfg.transformer, cfg.vqvae.num_embeddings, int(torch.tensor(latent).prod()))
    detector = Detector(cfg, vqvae, transformer, latent, device)
    image = torch.rand(1, *size)
    n = det.samples * det.dropout_passes
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} CPU"
          f", torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"# preset {args.preset}, grid {'x'.join(map(str, size))} ({args.dims}D), tokens {'x'.join(map(str, latent))}"
          f" = {int(torch.tensor(latent).prod())}, S={det.samples}, D={det.dropout_passes}, N={n}, flagged "
          f"{args.flagged_share:.0%}; streamed decode batch {detector.streamed_decode_batch(int(torch.tensor(size).prod()))}"
          f", in-memory {det.decode_batch}; reconstructions held by the old path "
          f"{Detector.reconstruction_bytes(n, int(torch.tensor(size).prod())) / 2 ** 20:.0f} MB")
    results = {c: measure(detector, image, c, args.flagged_share) for c in args.columns}
    stages = ["encode", "likelihood", "resampling", "decoding", "KDE"]
    print(f"{'stage':<12}" + "".join(f"{c + ' s':>18}{c + ' MB':>18}" for c in args.columns))
    for s in stages:
        print(f"{s:<12}" + "".join(f"{results[c].seconds[s]:>18.2f}{results[c].peak[s]:>18.0f}" for c in args.columns))
    print(f"{'total':<12}" + "".join(f"{sum(results[c].seconds.values()):>18.2f}{max(results[c].peak.values()):>18.0f}"
                                     for c in args.columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
