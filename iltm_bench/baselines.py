"""Baselines: the Dense AE and Dense VAE of Baur et al. (2021), "Autoencoders for unsupervised anomaly segmentation
in brain MR images: a comparative study", and the self-supervised NSA (:mod:`iltm_bench.nsa`) and CutPaste
(:mod:`iltm_bench.cutpaste`).

A convolutional encoder (stride-2 convolutions) ends in a *dense* bottleneck: flatten -> linear -> latent vector
(the VAE: a mean and a log-variance, then the reparameterisation) -> linear -> unflatten, and a mirrored decoder
of transposed convolutions. Both train on the same preprocessed scans as the VQ-VAE (``iltm.preprocess``, same
augmentation) with an L1 reconstruction loss, plus beta x KL for the VAE.

The anomaly score is the residual between the input and its reconstruction. PET lesions are hot (brighter than
what a model of normal uptake reconstructs), so by default only the positive residual max(x - recon, 0) counts,
followed by Baur et al.'s median-filter post-processing; ``residual="absolute"`` gives their plain |x - recon|.
NSA's score is its U-Net's voxel probability of a synthetic anomaly; CutPaste's is the Mahalanobis distance of
the patches around a voxel to the Gaussian of the training patches' features. Scores are written as
``<id>_score.nii.gz`` on each input's own grid, like ``iltm detect``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, List

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from iltm import config as config_mod
from iltm.checkpoint import load_checkpoint, save_checkpoint
from iltm.config import Config, DataConfig, setting
from iltm.errors import InputError
from iltm.layout import SCORE_SUFFIX
from iltm.progress import Reporter

from .cutpaste import VARIANTS
from .nsa import GRADIENTS

FORMAT = "iltm-dense-autoencoder"
FORMAT_VERSION = 1
METHODS = ("ae", "vae", "nsa", "cutpaste")
NAMES = {"ae": "Dense AE", "vae": "Dense VAE", "nsa": "NSA", "cutpaste": "CutPaste"}
RESIDUALS = ("positive", "absolute")


@dataclass
class BaselineConfig:
    """Shape and training schedule of the Dense AE / VAE, NSA and CutPaste; the ``baselines`` section of the
    bench's config tree (:class:`BenchConfig`).

    Attributes:
        channels: feature channels of the encoder's stride-2 convolutions (the decoder mirrors them); NSA's U-Net
            has these channels at ``len(channels) - 1`` stride-2 levels.
        kernel_size: convolution kernel (Baur et al.: 5).
        latent_size: length of the dense latent vector z (Baur et al.: 512).
        beta: weight of the VAE's KL term (L1 and KL summed over an image, divided by its voxel count).
        epochs: the AE's and VAE's epochs.
        batch_size: scans per optimiser step.
        learning_rate: AdamW's initial rate.
        residual: "positive" = max(x - recon, 0) (hot lesions) or "absolute" = |x - recon|.
        median_size: median filter (voxels per axis) applied to the residual; 0 or 1 = none.
        nsa_epochs: NSA's epochs (learning from synthetic anomalies needs more steps than a reconstruction).
        cutpaste_epochs: CutPaste's epochs (the paper: 256).
        cutpaste_variant: CutPaste's pretext task: "binary", "scar" or "3way" (:mod:`iltm_bench.cutpaste`).
        nsa_resize: NSA resamples its source patches at a random scale (the paper's patch rescaling).
        nsa_gradients: NSA's Poisson blend follows the "source" patch's gradients or the larger of the patch's and
            the scan's ("mixed").
    """

    channels: List[int] = setting(factory=lambda: [32, 64, 128, 128], low=1)
    kernel_size: int = setting(5, low=1)
    latent_size: int = setting(512, low=1)
    beta: float = setting(1.0, low=0)
    epochs: int = setting(300, low=0)
    batch_size: int = setting(8, low=1)
    learning_rate: float = setting(1e-4, low=0, above=True)
    residual: str = setting("positive", choices=RESIDUALS)
    median_size: int = setting(3, low=0)
    nsa_epochs: int = setting(300, low=0)
    cutpaste_epochs: int = setting(256, low=0)
    cutpaste_variant: str = setting("binary", choices=VARIANTS)
    nsa_resize: bool = setting(False)
    nsa_gradients: str = setting("source", choices=GRADIENTS)

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)

    def check(self) -> None:
        if not self.channels:
            raise ValueError("baselines.channels=[]: needs at least one level")


@dataclass
class BenchConfig(Config):
    """The bench's one config tree: the core's sections plus ``baselines``."""

    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def core(self) -> Config:
        """The core's tree alone (what a run folder's ``config.yaml`` holds)."""
        return Config(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(Config)})


# Overrides of the paper-sized defaults, matching the sizes (and CPU budgets) of iltm.config's presets.
BASELINE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "small": dict(channels=[32, 64, 128], latent_size=256, epochs=150, batch_size=8, learning_rate=5e-4),
    "tiny": dict(channels=[16, 32, 64], kernel_size=3, latent_size=64, epochs=60, batch_size=8,
                 learning_rate=2e-3, cutpaste_epochs=100),
}
PRESETS = {name: {**values, "baselines": BASELINE_PRESETS[name]} for name, values in config_mod.PRESETS.items()}


def build_config(preset: str = "tiny", overrides: list[str] = (), **top: Any) -> BenchConfig:
    """The bench's validated tree: a preset for ILTM and the baselines, then ``SECTION.KEY=VALUE`` overrides
    (``baselines.epochs=10`` included); see :func:`iltm.config.build`."""
    return config_mod.build(preset, overrides=overrides, root=BenchConfig, presets=PRESETS, **top)


# -- the network -------------------------------------------------------------------------------------------------

class DenseAutoencoder(nn.Module):
    """Convolutional encoder -> dense latent vector -> convolutional decoder, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_shape: spatial size of the input (numpy order), every axis a multiple of 2 ** len(channels).
        channels: encoder feature channels, one stride-2 convolution each.
        latent_size: length of z.
        variational: a VAE (mean and log-variance heads, reparameterisation in training) instead of an AE.
        kernel_size: convolution kernel size.
    """

    def __init__(self, spatial_dims: int, in_shape: tuple[int, ...], channels: list[int], latent_size: int,
                 variational: bool = False, kernel_size: int = 5):
        super().__init__()
        from monai.networks.blocks import Convolution

        if spatial_dims not in (2, 3) or len(in_shape) != spatial_dims:
            raise ValueError(f"in_shape {in_shape} does not fit spatial_dims={spatial_dims}")
        factor = 2 ** len(channels)
        if any(s % factor for s in in_shape):
            raise ValueError(f"in_shape {in_shape} must be a multiple of {factor} on every axis")
        self.spatial_dims, self.in_shape, self.variational = spatial_dims, tuple(in_shape), variational
        act, norm = ("leakyrelu", {"negative_slope": 0.2}), "batch"
        layers, c_in = [], 1
        for c in channels:                                                     # (B, c, *in_shape / 2^level)
            layers.append(Convolution(spatial_dims, c_in, c, strides=2, kernel_size=kernel_size, act=act, norm=norm))
            c_in = c
        self.encoder = nn.Sequential(*layers)
        self.bottleneck_shape = (channels[-1], *[s // factor for s in in_shape])
        flat = int(np.prod(self.bottleneck_shape))
        self.to_latent = nn.Linear(flat, latent_size)
        self.to_logvar = nn.Linear(flat, latent_size) if variational else None
        self.from_latent = nn.Linear(latent_size, flat)
        layers = []
        for c_out in list(reversed(channels[:-1])) + [channels[0]]:
            layers.append(Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=kernel_size, act=act,
                                      norm=norm, is_transposed=True))
            c_in = c_out
        # A linear 1x1 output: intensities are not squashed, so "8bit" (0..255) inputs work as well as [0, 1].
        layers.append(Convolution(spatial_dims, c_in, 1, kernel_size=1, conv_only=True))
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, 1, *in_shape) -> mean (B, latent) and log-variance (B, latent) (``None`` for the AE)."""
        h = self.encoder(x).flatten(1)
        return self.to_latent(h), (self.to_logvar(h) if self.variational else None)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        """z = mu + sigma * N(0, 1) while training; the mean itself in eval mode (a deterministic score)."""
        if logvar is None or not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent) -> reconstruction (B, 1, *in_shape)."""
        h = self.from_latent(z).reshape(z.shape[0], *self.bottleneck_shape)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (reconstruction (B, 1, *in_shape), mu (B, latent), logvar (B, latent) or ``None``)."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over the latent, one value per image: (B, latent) -> (B,)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def loss_terms(model: DenseAutoencoder, x: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-voxel L1 (+ beta x KL per voxel for the VAE); ``total`` is what training minimises."""
    recon, mu, logvar = model(x)
    l1 = F.l1_loss(recon, x)
    terms = {"l1": l1, "total": l1}
    if logvar is not None:
        kl = kl_divergence(mu, logvar).mean() / float(np.prod(x.shape[1:]))
        terms.update(kl=kl, total=l1 + beta * kl)
    return terms


# -- a trained baseline ------------------------------------------------------------------------------------------

class Baseline:
    """A trained Dense AE / VAE, NSA or CutPaste with the preprocessing it was trained with; scores images on their
    own grid."""

    def __init__(self, method: str, model: nn.Module, cfg: BaselineConfig, data_cfg: DataConfig,
                 device: torch.device, extra: dict | None = None):
        from iltm.preprocess import Preprocessor

        self.method, self.cfg, self.data_cfg, self.device = method, cfg, data_cfg, device
        self.model = model.to(device).eval()
        self.preprocessor = Preprocessor(data_cfg, cfg.downsample_factor)
        self.extra = extra or {}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        save_checkpoint(path, FORMAT, FORMAT_VERSION, {
            "method": self.method, "config": dataclasses.asdict(self.cfg), "data": dataclasses.asdict(self.data_cfg),
            "spatial_dims": self.model.spatial_dims, "in_shape": list(self.model.in_shape),
            "state_dict": self.model.state_dict(), **self.extra, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Baseline":
        payload = load_checkpoint(path, FORMAT, FORMAT_VERSION, map_location="cpu", what="baseline checkpoint")
        cfg = config_mod.from_dict({"baselines": payload["config"]}, where=str(path), root=BenchConfig).baselines
        data_cfg = DataConfig(**payload["data"])
        model = build(payload["method"], payload["spatial_dims"], tuple(payload["in_shape"]), cfg)
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise InputError(path, f"weights do not match the stored config ({str(exc).splitlines()[0]})") from None
        if payload["method"] == "cutpaste" and not {"gde_mean", "gde_precision"} <= set(payload):
            raise InputError(path, "CutPaste checkpoint without its Gaussian of training patches (gde_mean, "
                                   "gde_precision): the training did not finish; train it again")
        known = {"format", "version", "method", "config", "data", "spatial_dims", "in_shape", "state_dict"}
        return cls(payload["method"], model, cfg, data_cfg, torch.device(device),
                   extra={k: v for k, v in payload.items() if k not in known})

    @torch.no_grad()
    def residual_array(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, *spatial) preprocessed image -> (residual score, reconstruction), both (*spatial) float32."""
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(self.device)
        recon = self.model(x)[0][0, 0].cpu().numpy()
        diff = array[0] - recon
        score = np.maximum(diff, 0.0) if self.cfg.residual == "positive" else np.abs(diff)
        if self.cfg.median_size > 1:
            from scipy import ndimage

            score = ndimage.median_filter(score, size=int(self.cfg.median_size), mode="nearest")
        return score.astype(np.float32), recon.astype(np.float32)

    @torch.no_grad()
    def score_array(self, array: np.ndarray) -> np.ndarray:
        """(1, *spatial) preprocessed image -> (*spatial) float32 score: the residual, NSA's probability or
        CutPaste's patch distance."""
        if self.method == "cutpaste":
            from . import cutpaste

            return cutpaste.score_map(self.model, array, self.extra, self.device)
        if self.method != "nsa":
            return self.residual_array(array)[0]
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(self.device)
        return torch.sigmoid(self.model(x))[0, 0].cpu().numpy().astype(np.float32)

    def score_image(self, img: sitk.Image, where: str = "image") -> sitk.Image:
        """The score of a scan, float32, on exactly the scan's size, spacing, origin and direction."""
        array, info = self.preprocessor.forward(img, where=where)
        score = self.score_array(array)
        return sitk.Cast(self.preprocessor.inverse(score, info, interpolator="linear"), sitk.sitkFloat32)


def build(method: str, spatial_dims: int, in_shape: tuple[int, ...], cfg: BaselineConfig) -> nn.Module:
    if method not in METHODS:
        raise InputError("--methods", f"unknown baseline '{method}' (choose from {', '.join(METHODS)})")
    if method == "nsa":
        from . import nsa

        net = nsa.build(spatial_dims, list(cfg.channels))
        net.spatial_dims, net.in_shape = spatial_dims, tuple(in_shape)  # what a checkpoint records, as for the AE
        return net
    if method == "cutpaste":
        from . import cutpaste

        return cutpaste.build(spatial_dims, tuple(in_shape), list(cfg.channels), cfg.cutpaste_variant)
    return DenseAutoencoder(spatial_dims, in_shape, list(cfg.channels), cfg.latent_size,
                            variational=method == "vae", kernel_size=cfg.kernel_size)


def train_baseline(method: str, out: str | Path, cfg: Config, baseline_cfg: BaselineConfig, data: str | Path,
                   reporter: Reporter | None = None) -> Baseline:
    """Train a Dense AE (``"ae"``), VAE (``"vae"``), NSA (``"nsa"``) or CutPaste (``"cutpaste"``) on the scans in
    ``data``, saved as ``out``. CutPaste also fits its Gaussian of normal patch features on the training scans.

    Args:
        cfg: the run's config: its ``data`` section (intensity, spacing, augmentation), ``seed`` and ``device``
            are used exactly as for the ILTM run; the network's input size is the largest preprocessed scan
            rounded up to the baseline's downsampling factor.
        baseline_cfg: network shape and schedule.
        data: folder of scans (or images/ + labels/), CSV list, or one file.

    An interrupted training resumes from ``<out>.fit.pt``; a finished ``out`` is loaded, not retrained.
    """
    from iltm.detect import resolve_device
    from iltm.io import read_image
    from iltm.preprocess import Preprocessor
    from iltm.train import TrainingSet, fit, gather_inputs, image_batches, seed_everything

    reporter = reporter or Reporter("none")
    out = Path(out)
    device = resolve_device(cfg.device)
    if out.is_file():
        return Baseline.load(out, device)
    records = gather_inputs(data, cfg, skip_unreadable=False, reporter=reporter)
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.spatial_dims = len(read_image(records[0].image).GetSize())
    factor = baseline_cfg.downsample_factor
    if data_cfg.spatial_size is None:
        free = Preprocessor(data_cfg, factor)
        shape = np.max([free.forward(read_image(r.image), where=str(r.image))[0].shape[1:] for r in records], axis=0)
        data_cfg.spatial_size = [int(math.ceil(s / factor) * factor) for s in reversed(shape.tolist())]
    else:
        data_cfg.spatial_size = [int(math.ceil(s / factor) * factor) for s in data_cfg.spatial_size]
    data_set = TrainingSet(records, Preprocessor(data_cfg, factor), reporter)
    seed_everything(cfg.seed)
    model = build(method, data_cfg.spatial_dims, tuple(reversed(data_cfg.spatial_size)), baseline_cfg).to(device)
    batches = image_batches(data_set, replace(cfg, data=data_cfg), baseline_cfg.batch_size, device)

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = out.with_name(out.name + ".fit.pt")
    if method == "nsa":
        from . import nsa

        rng = np.random.default_rng(cfg.seed)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return nsa.loss(model, x, rng, data_cfg.intensity_range, baseline_cfg.nsa_resize,
                            baseline_cfg.nsa_gradients)
    elif method == "cutpaste":
        from . import cutpaste

        rng = np.random.default_rng(cfg.seed)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return cutpaste.loss(model, x, rng)
    else:
        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return loss_terms(model, x, baseline_cfg.beta)["total"]
    epochs = {"nsa": baseline_cfg.nsa_epochs, "cutpaste": baseline_cfg.cutpaste_epochs}.get(method,
                                                                                        baseline_cfg.epochs)
    losses = fit(model, batches, loss_of, epochs, baseline_cfg.learning_rate, checkpoint, reporter,
                 f"train {NAMES[method]}", units=0.0)
    extra = {}
    if method == "cutpaste":  # the Gaussian of the training scans' patch features, after the pretext training
        extra = cutpaste.fit_density(model, data_set.arrays, device)
    baseline = Baseline(method, model, baseline_cfg, data_cfg, device, extra=extra)
    baseline.save(out, extra={"losses": losses, "train_seconds": time.perf_counter() - start,
                              "training_ids": [r.id for r in records]})
    checkpoint.unlink(missing_ok=True)
    return Baseline.load(out, device)


def score_files(baseline: Baseline, records, out: str | Path, reporter: Reporter | None = None) -> list[Path]:
    """Write ``<id>_score.nii.gz`` (residual score on the input's grid) for every record into ``out``.

    Args:
        records: ``iltm.io.ImageRecord`` list (from ``iltm.io.list_images``).
    """
    from iltm.io import read_image, write_image

    reporter = reporter or Reporter("none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in reporter.track(records, f"score with {NAMES[baseline.method]}"):
        path = out / f"{rec.id}{SCORE_SUFFIX}"
        write_image(baseline.score_image(read_image(rec.image), where=str(rec.image)), path)
        written.append(path)
    return written


def score_folder(model_path: str | Path, data: str | Path, out: str | Path, device: str = "auto",
                 reporter: Reporter | None = None) -> list[Path]:
    """Score every scan in ``data`` (folder, CSV list or file) with the baseline saved at ``model_path``."""
    from iltm.detect import resolve_device
    from iltm.io import list_images

    return score_files(Baseline.load(model_path, resolve_device(device)), list_images(data), out, reporter)
