"""The VQ-VAE stage: MONAI's ``VQVAE`` built from the config, tokenisation and dropout decoding.

Tokens are the codebook indices of the latent grid, flattened in raster (C) order so the Transformer sees a
1D sequence; ``latent_shape`` brings them back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from monai.networks.nets import VQVAE

from .config import VQVAEConfig
from .errors import InputError
from .checkpoint import load_checkpoint, save_checkpoint

FORMAT = "iltm-vqvae"
FORMAT_VERSION = 1


def build_vqvae(cfg: VQVAEConfig, spatial_dims: int) -> VQVAE:
    """A MONAI VQVAE with ``len(cfg.channels)`` stride-2 downsamplings, one input and one output channel."""
    cfg.check()
    levels = len(cfg.channels)
    return VQVAE(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.channels),
        num_res_layers=cfg.num_res_layers,
        num_res_channels=tuple([cfg.num_res_channels] * levels),
        downsample_parameters=tuple([(2, 4, 1, 1)] * levels),
        upsample_parameters=tuple([(2, 4, 1, 1, 0)] * levels),
        num_embeddings=cfg.num_embeddings,
        embedding_dim=cfg.embedding_dim,
        commitment_cost=cfg.commitment_cost,
        decay=cfg.decay,
        dropout=cfg.dropout,
        act=cfg.act,
    )


DEAD_CODE_SHARE = 0.01  # a code is dead when its EMA usage is below this share of the mean code's usage
KMEANS_MAX_VECTORS = 65536  # encoder outputs the codebook's k-means sees at most (a random subset beyond that)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode for the block, then every submodule back in its own mode, not just the top one's: in
    detection mode the decoder alone trains (dropout), and ``model.train(False)`` afterwards would switch it off."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _set_codebook(quantizer, vectors: torch.Tensor, which: torch.Tensor | slice = slice(None)) -> None:
    """Put codebook vectors ``which`` at ``vectors`` with an EMA usage of 1, so that MONAI's EMA update keeps
    them there until latents are assigned to them; rank 0's values are broadcast under ``torchrun``."""
    q = quantizer
    q.embedding.weight.data[which] = vectors
    q.ema_w.data[which] = vectors
    q.ema_cluster_size.data[which] = 1.0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data):
            torch.distributed.broadcast(tensor, src=0)


@torch.no_grad()
def init_codebook_from_encoder(model: VQVAE, images, seed: int) -> int:
    """Place the codebook at k-means centroids of the encoder's outputs on ``images`` (before any training).

    MONAI draws the codebook from N(0, 1), a norm of about sqrt(embedding_dim), while a fresh encoder's outputs
    have norms near 0.1: every latent then takes the same code. Centroids of the encoder's outputs start every code
    in use (k-means++ seeding and Lloyd iterations, ``scipy.cluster.vq.kmeans2``). That alone did not stop the 3D
    ``tiny`` codebook from collapsing later in training (Testing/Benchmarks/results/README.md, "3D: the VQ-VAE").

    Args:
        images: iterable of (B, 1, *spatial) tensors on the model's device (the training batches).
        seed: seeds the subset and the k-means, so every rank computes the same codebook.

    Returns:
        the number of distinct codes the encoder outputs take afterwards.
    """
    import warnings

    import numpy as np
    from scipy.cluster.vq import kmeans2

    q = model.quantizer.quantizer
    with eval_mode(model):
        flat = torch.cat([model.encode(x).permute(q.flatten_permutation).reshape(-1, q.embedding_dim).float().cpu()
                          for x in images])
    rng = np.random.default_rng(seed)
    if flat.shape[0] > KMEANS_MAX_VECTORS:
        flat = flat[torch.from_numpy(rng.choice(flat.shape[0], KMEANS_MAX_VECTORS, replace=False))]
    if flat.shape[0] <= q.num_embeddings:  # no more latents than codes: each latent is a code, the rest repeat them
        extra = torch.from_numpy(rng.integers(0, flat.shape[0], q.num_embeddings - flat.shape[0]))
        centroids = torch.cat([flat, flat[extra]])
    else:
        with warnings.catch_warnings():  # a cluster left empty keeps its k-means++ seed, a latent: that is fine
            warnings.filterwarnings("ignore", "One of the clusters is empty")
            centroids = torch.from_numpy(kmeans2(flat.double().numpy(), q.num_embeddings, iter=20, minit="++",
                                                 seed=rng)[0])
    _set_codebook(q, centroids.to(q.embedding.weight))
    return int(torch.cdist(flat, centroids.float()).argmin(dim=1).unique().numel())


class DeadCodeRestarter:
    """Re-seeds dead codebook vectors with encoder outputs of the current batch while a VQ-VAE trains.

    MONAI's EMA quantiser keeps a running count of how many latent vectors each code takes. A code whose count
    falls below ``DEAD_CODE_SHARE`` of the mean is moved onto a random encoder output of the latest batch (the
    "random restart" of Dhariwal et al., Jukebox, 2020), so a codebook that started to collapse onto a few codes
    spreads out again. Call :meth:`after_step` after each training forward pass; it acts for ``until_step`` steps.
    Under ``torchrun`` every rank sees the same counts (the quantiser syncs them), so all decide alike, and rank 0's
    new vectors are broadcast.
    """

    def __init__(self, model: VQVAE, until_step: int, seed: int):
        self.quantizer = model.quantizer.quantizer
        self.until_step, self.seed = until_step, seed
        self.step, self.restarted = 0, 0
        self._inputs: torch.Tensor | None = None
        self._hook = self.quantizer.register_forward_pre_hook(self._keep_inputs)

    def _keep_inputs(self, module, args) -> None:
        if module.training:
            self._inputs = args[0].detach()

    @torch.no_grad()
    def after_step(self) -> int:
        """Restart the dead codes now; returns how many."""
        self.step += 1
        q, inputs, self._inputs = self.quantizer, self._inputs, None
        if self.step > self.until_step or inputs is None:
            return 0
        usage = q.ema_cluster_size
        dead = usage < DEAD_CODE_SHARE * usage.mean()
        count = int(dead.sum())
        if count == 0:
            return 0
        flat = inputs.permute(q.flatten_permutation).reshape(-1, q.embedding_dim).float()
        generator = torch.Generator(device="cpu").manual_seed(self.seed + self.step)
        _set_codebook(q, flat[torch.randint(0, flat.shape[0], (count,), generator=generator).to(flat.device)], dead)
        self.restarted += count
        return count

    def close(self) -> None:
        self._hook.remove()


@torch.no_grad()
def encode_tokens(model: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """Codebook indices of images.

    Args:
        images: (B, 1, *spatial) normalised intensities.

    Returns:
        (B, *latent) long, latent = spatial / 2**levels.
    """
    with eval_mode(model):  # no EMA codebook update, no dropout in the encoder
        return model.index_quantize(images)


def set_detection_mode(model: VQVAE) -> None:
    """Dropout active in the decoder only; encoder and codebook frozen (eval => no EMA updates)."""
    model.eval()
    model.decoder.train()
    for p in model.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def decode_tokens(model: VQVAE, tokens: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Decode (B, *latent) token grids to (B, 1, *spatial) images in chunks of ``batch``.

    Dropout is whatever mode the decoder is in: call :func:`set_detection_mode` first for stochastic decodes.
    """
    out = [model.decode_samples(tokens[i:i + batch]) for i in range(0, tokens.shape[0], batch)]
    return torch.cat(out, dim=0)


def save_vqvae(model: VQVAE, cfg: VQVAEConfig, spatial_dims: int, path: str | Path, extra: dict | None = None) -> None:
    import dataclasses

    save_checkpoint(path, FORMAT, FORMAT_VERSION, {
        "config": dataclasses.asdict(cfg),
        "spatial_dims": spatial_dims,
        "state_dict": model.state_dict(),
        **(extra or {}),
    })


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VQVAE, dict]:
    """Load a saved VQ-VAE; returns (model in eval mode, the stored payload)."""
    payload = load_checkpoint(path, FORMAT, FORMAT_VERSION, map_location, what="VQ-VAE checkpoint")
    cfg = VQVAEConfig(**payload["config"])
    model = build_vqvae(cfg, payload["spatial_dims"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match the stored VQ-VAE config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model.to(map_location), payload
