"""The VQ-VAE stage: MONAI's ``VQVAE`` built from the config, tokenisation and dropout decoding.

Tokens are the codebook indices of the latent grid, flattened in raster (C) order so the Transformer sees a
1D sequence; ``latent_shape`` brings them back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from monai.networks.layers.vector_quantizer import VectorQuantizer
from monai.networks.nets import VQVAE

from . import config as config_mod
from .config import VQVAEConfig
from .errors import InputError
from .checkpoint import load_checkpoint, save_checkpoint

FORMAT = "iltm-vqvae"
FORMAT_VERSION = 1


def build_vqvae(cfg: VQVAEConfig, spatial_dims: int) -> VQVAE:
    """A MONAI VQVAE with ``len(cfg.channels)`` stride-2 downsamplings, one input and one output channel; its codebook
    distances and EMA updates run in float32 even under autocast."""
    levels = len(cfg.channels)
    model = VQVAE(
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
    )
    # A class swap rather than a new wrapper module: the weights' names stay, and no constructor draws from the RNG.
    model.quantizer.__class__ = Float32Quantizer
    return model


class Float32Quantizer(VectorQuantizer):
    """MONAI's quantizer with autocast off for all of it: MONAI turns it off for CUDA in the codebook distances only,
    not in the EMA update nor on a CPU. Under float32 it is MONAI's own, bit for bit."""

    def forward(self, inputs: torch.Tensor):
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            return super().forward(inputs.float())

    def quantize(self, encodings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=encodings.device.type, enabled=False):
            return super().quantize(encodings.float())


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


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu",
               data: bytes | None = None) -> tuple[VQVAE, dict]:
    """Load a saved VQ-VAE (from ``data`` when given: a bundle member named ``path``); returns (model in eval mode,
    the stored payload)."""
    payload = load_checkpoint(path, FORMAT, FORMAT_VERSION, map_location, what="VQ-VAE checkpoint", data=data,
                              required=("config", "spatial_dims", "state_dict", "latent_shape"))
    if not isinstance(payload["config"], dict) or payload["spatial_dims"] not in (2, 3):
        raise InputError(path, "VQ-VAE checkpoint is damaged: its config or spatial_dims is not what iltm writes")
    latent = payload["latent_shape"]
    if not isinstance(latent, (list, tuple)) or len(latent) != payload["spatial_dims"] or \
            not all(isinstance(n, int) and n > 0 for n in latent):
        raise InputError(path, f"VQ-VAE checkpoint is damaged: latent_shape {latent!r} is not "
                               f"{payload['spatial_dims']} positive sizes")
    cfg = config_mod.from_dict({"vqvae": payload["config"]}, where=str(path)).vqvae
    model = build_vqvae(cfg, payload["spatial_dims"])
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputError(path, f"weights do not match the stored VQ-VAE config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model.to(map_location), payload
