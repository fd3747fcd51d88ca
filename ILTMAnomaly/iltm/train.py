"""Training: the VQ-VAE once, then the ILTM loop of masked Transformers (DESIGN.md step 4).

Every finished step leaves its result in the run folder (see :mod:`iltm.run`), so ``train(resume=True)`` picks up
after the last finished step: a finished VQ-VAE, Transformer or per-scan mask is never recomputed, and an
interrupted training stage restarts from its last epoch checkpoint.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .detect import Detector, resolve_device
from .errors import InputError
from .io import ImageRecord, atomic_path, check_images, list_images, read_image, write_image
from .layout import FORMAT_VERSION
from .precision import autocast
from .preprocess import Preprocessor, augmentation
from .progress import Reporter
from .run import RunFolder
from .transformer import TokenTransformer, masked_cross_entropy
from .vqvae import build_vqvae, encode_tokens, load_vqvae, save_vqvae

FIT_FORMAT = "iltm-fit-checkpoint"
SAVE_EVERY_SECONDS = 30.0


def iteration_threshold(cfg: Config, k: int) -> float:
    """Resampling threshold of iteration k: t0 (1 - decay)^k, or t0 throughout with a constant threshold."""
    t0 = cfg.detection.resampling_threshold
    return t0 if cfg.iltm.constant_threshold else t0 * (1.0 - cfg.iltm.threshold_decay) ** k


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- one generic, resumable optimisation loop ------------------------------------------------------------------

def lr_factor(epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` as a fraction of the initial one: a cosine decay to 10 % over ``epochs`` (small
    cohorts need the late, gentle steps to settle)."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))


def fit(model: torch.nn.Module, batches: Callable[[int], Iterable[Any]], loss_of: Callable[[Any], torch.Tensor],
        epochs: int, learning_rate: float, checkpoint: Path, reporter: Reporter, stage: str, units: float,
        weight_decay: float = 0.0, precision: str = "float32") -> list[float]:
    """AdamW with a cosine schedule over ``epochs``, checkpointed at least every 30 s to ``checkpoint``.

    Args:
        model: the module to optimise (possibly DDP-wrapped; its ``module`` is what gets saved).
        batches: epoch -> iterable of batches (this rank's share).
        loss_of: batch -> scalar loss.
        checkpoint: where the epoch state goes; when it exists the loop resumes from it.
        precision: the forward passes' precision (``Config.precision``); bfloat16 needs no loss scaling, and the
            weights, gradients and optimiser state stay float32.

    Returns:
        mean loss per epoch (all epochs, including those before a resume).
    """
    inner = getattr(model, "module", model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, epochs))
    start, losses = 0, []
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint, FIT_FORMAT, 1, map_location=dist.model_device(model),
                                what="training checkpoint",
                                required=("model", "optimizer", "scheduler", "epoch", "losses"))
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses = state["epoch"], state["losses"]
        reporter.log(f"{stage}: resuming at epoch {start}/{epochs}")
    last_save = time.monotonic()
    device = dist.model_device(model)
    model.train()
    for epoch in reporter.track(range(start, epochs), stage, total=epochs - start, units=units):
        total, count = 0.0, 0
        for batch in batches(epoch):
            with autocast(precision, device):
                loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            count += 1
        sched.step()
        losses.append(dist.mean_across_ranks(total / max(count, 1), device))
        if dist.is_main() and (time.monotonic() - last_save > SAVE_EVERY_SECONDS or epoch == epochs - 1):
            save_checkpoint(checkpoint, FIT_FORMAT, 1, {"model": inner.state_dict(), "optimizer": opt.state_dict(),
                                                       "scheduler": sched.state_dict(), "epoch": epoch + 1,
                                                       "losses": losses})
            last_save = time.monotonic()
    model.eval()
    return losses


def shuffled_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """This rank's batches of indices for one epoch (same permutation on every rank, then sharded)."""
    order = np.random.default_rng(seed * 1000003 + epoch).permutation(n).tolist()
    # Equal shares on every rank: DDP waits for every rank at each step, so an extra batch on one rank would hang.
    mine = dist.shard(order[: len(order) - len(order) % dist.world_size()])
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def stage_batch_size(n_scans: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """The batch size a stage trains with: ``batch_size``, made smaller (not below 1) until ``epochs`` epochs over
    this rank's share of ``n_scans`` scans make at least ``min_steps`` optimiser steps (0: never smaller)."""
    share = n_scans // dist.world_size()  # shuffled_batches gives every rank the same number of scans
    size = batch_size
    while size > 1 and math.ceil(share / size) * epochs < min_steps:
        size -= 1
    return size


def vqvae_schedule(n_scans: int, vq_cfg, dims: int | None) -> tuple[int, int]:
    """(batch size, epochs) of the VQ-VAE's training on ``n_scans`` scans of ``dims`` D: ``batch_size`` made smaller
    for ``min_steps`` (:func:`stage_batch_size`), then ``epochs`` cut to as many whole epochs as make ``max_steps``
    optimiser steps, so that the cost stops growing with the cohort."""
    batch = stage_batch_size(n_scans, vq_cfg.batch_for(dims), vq_cfg.epochs, vq_cfg.min_steps_for(dims))
    epochs, cap = vq_cfg.epochs, vq_cfg.max_steps_for(dims)
    if cap:
        per_epoch = max(1, math.ceil((n_scans // dist.world_size()) / batch))
        epochs = min(epochs, math.ceil(cap / per_epoch))
    return batch, epochs


# -- data ------------------------------------------------------------------------------------------------------

class TrainingSet:
    """The training scans, preprocessed once to the model grid (arrays (1, *spatial)) with their geometry info."""

    def __init__(self, records: list[ImageRecord], preprocessor: Preprocessor, reporter: Reporter):
        self.records = records
        self.arrays: list[np.ndarray] = []
        self.infos: list[Any] = []
        for rec in reporter.track(records, "preprocess"):
            image = read_image(rec.image, units=preprocessor.cfg.units)
            array, info = preprocessor.forward(image, where=str(rec.image))
            self.arrays.append(array.astype(np.float32))
            self.infos.append(info)

    def __len__(self) -> int:
        return len(self.records)


def gather_inputs(data: str | Path, cfg: Config, skip_unreadable: bool, reporter: Reporter) -> list[ImageRecord]:
    """List and check every training scan; all unreadable files are reported at once."""
    records = list_images(data)
    good, problems = check_images(records, skip_unreadable=skip_unreadable, units=cfg.data.units)
    if problems and not skip_unreadable:
        listing = "; ".join(f"{path}: {why}" for path, why in problems)
        raise InputError(data, f"{len(problems)} unreadable input(s) — {listing} (use --skip-unreadable to skip them)")
    for path, why in problems:
        reporter.warn(f"skipping {path}: {why}")
    if not good:
        raise InputError(data, "no readable training images")
    return good


def model_grid_size(records: list[ImageRecord], cfg: Config) -> list[int]:
    """Common input size (x-y(-z) order) for all scans: the largest preprocessed extent, rounded up to the
    downsampling factor, so that every scan fits without cropping."""
    factor = cfg.vqvae.downsample_factor
    pre = Preprocessor(cfg.data, factor)
    shape = None
    for rec in records:
        array, _ = pre.forward(read_image(rec.image, units=cfg.data.units), where=str(rec.image))
        shape = array.shape[1:] if shape is None else np.maximum(shape, array.shape[1:])
    return [int(math.ceil(s / factor) * factor) for s in reversed(list(shape))]


def image_batches(data: TrainingSet, cfg: Config, batch_size: int, device: torch.device) -> Callable[[int], Iterable]:
    """epoch -> this rank's shuffled, augmented (B, 1, *spatial) image batches (augmentation as ``cfg.data``)."""
    augment = augmentation(cfg.data, cfg.data.spatial_dims, seed=cfg.seed + dist.rank()) if cfg.data.augment else None

    def batches(epoch: int):
        for idx in shuffled_batches(len(data), batch_size, epoch, cfg.seed):
            items = [torch.from_numpy(data.arrays[i]) for i in idx]
            if augment is not None:
                items = [torch.as_tensor(augment(x)) for x in items]
            yield torch.stack(items).float().to(device)

    return batches


# -- the stages --------------------------------------------------------------------------------------------------

def vqvae_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The VQ-VAE's training loss on batch ``x``: L1 reconstruction plus the quantisation (commitment) loss."""
    recon, quantization_loss = model(x)
    return F.l1_loss(recon.float(), x) + quantization_loss.float()


def train_vqvae_stage(run: RunFolder, cfg: Config, data: TrainingSet, device: torch.device, reporter: Reporter,
                      units: float, attempt: int = 0) -> dict[str, Any]:
    """Train the VQ-VAE into ``run.vqvae_path``. ``attempt`` n > 0 (``vqvae.collapse_retries``) starts from another
    initialisation than the run's own."""
    vq_cfg, dims = cfg.vqvae, cfg.data.spatial_dims
    batch_size, epochs = vqvae_schedule(len(data), vq_cfg, dims)
    if epochs != vq_cfg.epochs:
        reporter.log(f"VQ-VAE: {epochs} epochs instead of {vq_cfg.epochs}, over {len(data)} scans in batches of "
                     f"{batch_size}, the whole epochs that make {vq_cfg.max_steps_for(dims)} optimiser steps "
                     f"(vqvae.max_steps)")
    if batch_size != vq_cfg.batch_for(dims):
        reporter.log(f"VQ-VAE: batches of {batch_size} scans instead of {vq_cfg.batch_for(dims)}, so that "
                     f"{vq_cfg.epochs} epochs over {len(data)} scans make at least {vq_cfg.min_steps_for(dims)} steps "
                     f"(vqvae.min_steps)")
    if attempt:
        seed_everything(cfg.seed + 7727 * attempt)
    model = build_vqvae(vq_cfg, cfg.data.spatial_dims).to(device)
    ddp = dist.wrap(model)
    batches = image_batches(data, cfg, batch_size, device)
    start = time.perf_counter()
    losses = fit(ddp, batches, lambda x: vqvae_loss(ddp, x), epochs, vq_cfg.learning_rate,
                 run.root / "vqvae_checkpoint.pt", reporter, "train VQ-VAE", units, precision=cfg.precision)
    latent = encode_tokens(model, torch.from_numpy(data.arrays[0])[None].to(device)).shape[1:]
    summary = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "epochs": epochs, "batch_size": batch_size, "seconds": time.perf_counter() - start}
    if attempt:
        summary["attempt"] = attempt
    if dist.is_main():
        save_vqvae(model, vq_cfg, cfg.data.spatial_dims, run.vqvae_path,
                   extra={"latent_shape": list(latent), "losses": losses})
    dist.barrier()
    return summary


@torch.no_grad()
def tokenize_stage(run: RunFolder, data: TrainingSet, vqvae, device: torch.device, reporter: Reporter) -> torch.Tensor:
    """Token rasters of every training scan, (M, L) long, cached in ``tokens.pt``."""
    if run.tokens_path.is_file():
        tokens = load_checkpoint(run.tokens_path, "iltm-tokens", 1, what="token cache", required=("tokens",))["tokens"]
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[0] == len(data.arrays):
            return tokens
        reporter.warn(f"{run.tokens_path} does not match the training scans; encoding them again")
    rows = [encode_tokens(vqvae, torch.from_numpy(a)[None].to(device)).reshape(-1).cpu()
            for a in reporter.track(data.arrays, "tokenize")]
    tokens = torch.stack(rows)
    if dist.is_main():
        save_checkpoint(run.tokens_path, "iltm-tokens", 1, {"tokens": tokens, "ids": [r.id for r in data.records]})
    dist.barrier()
    return tokens


def train_transformer_stage(run: RunFolder, cfg: Config, k: int, tokens: torch.Tensor,
                            token_masks: torch.Tensor | None, num_codes: int, device: torch.device,
                            reporter: Reporter, units: float, fold: int | None = None) -> dict[str, Any]:
    """Fit iteration k's Transformer on ``tokens`` (M, L) with ``token_masks`` (M, L) True = masked.

    ``fold`` j fits the cross-fitting Transformer of fold j instead (the caller passes the other folds' rows).
    """
    t_cfg = cfg.transformer
    seed_everything(cfg.seed + 7919 * (k + 1) + (0 if fold is None else 104729 * (fold + 1)))
    model = TokenTransformer(t_cfg, num_codes=num_codes, seq_len=tokens.shape[1]).to(device)
    ddp = dist.wrap(model)
    tokens = tokens.to(device)
    masks = token_masks.to(device) if token_masks is not None else None

    def batches(epoch: int):
        for idx in shuffled_batches(tokens.shape[0], t_cfg.batch_size, epoch, cfg.seed + k):
            yield idx

    def loss_of(idx: list[int]) -> torch.Tensor:
        m = masks[idx] if masks is not None else None
        return masked_cross_entropy(ddp(tokens[idx], m), tokens[idx], m)

    start = time.perf_counter()
    path = run.transformer_path(k) if fold is None else run.fold_transformer_path(k, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = path.with_name(path.stem + "_checkpoint.pt")
    label = f"iteration {k}: train Transformer" + ("" if fold is None else f" without fold {fold}")
    losses = fit(ddp, batches, loss_of, t_cfg.epochs, t_cfg.learning_rate, checkpoint, reporter, label, units,
                 weight_decay=t_cfg.weight_decay, precision=cfg.precision)
    if dist.is_main():
        model.save(path, extra={"iteration": k, "fold": fold, "losses": losses})
        checkpoint.unlink(missing_ok=True)
    dist.barrier()
    return {"transformer_loss": losses[-1] if losses else None, "transformer_loss_first": losses[0] if losses else None,
            "train_seconds": time.perf_counter() - start}


def fold_of(i: int, folds: int) -> int:
    """Cross-fitting fold of the i-th training scan (manifest order)."""
    return i % folds


def cross_fit_stage(run: RunFolder, cfg: Config, k: int, tokens: torch.Tensor, token_masks: torch.Tensor | None,
                    device: torch.device, reporter: Reporter, units: float) -> float:
    """Fit iteration k's fold Transformers (each without one fold's scans); returns seconds. Resumes per fold."""
    folds = cfg.iltm.cross_fit_folds
    start = time.perf_counter()
    for j in range(folds):
        if run.fold_transformer_path(k, j).is_file():
            reporter.units_done += units / folds
            continue
        keep = torch.tensor([i for i in range(tokens.shape[0]) if fold_of(i, folds) != j])
        train_transformer_stage(run, cfg, k, tokens[keep], None if token_masks is None else token_masks[keep],
                                cfg.vqvae.num_embeddings, device, reporter, units / folds, fold=j)
    return time.perf_counter() - start


PARTIAL_COLLAPSE_SHARE = 0.25  # warn when the training scans use fewer than this share of the codebook
SHARED_UPTAKE_RATIO = 0.8  # "as bright": at least this fraction of the flagged token's uptake


def token_uptake(arrays: list[np.ndarray], factor: int) -> torch.Tensor:
    """(M, L): the brightest voxel of each token's footprint in each (1, *spatial) array on the model grid."""
    x = torch.from_numpy(np.stack(arrays))                    # (M, 1, *spatial)
    pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
    return pool(x, kernel_size=factor, stride=factor).flatten(1)


def shared_uptake(uptake: torch.Tensor, i: int, share: float) -> torch.Tensor:
    """(L,) bool: positions where at least ``share`` of the scans other than i are at least
    ``SHARED_UPTAKE_RATIO`` times as bright as scan i (``iltm.spare_shared_uptake``)."""
    as_bright = uptake >= SHARED_UPTAKE_RATIO * uptake[i]     # (M, L), scan i itself always counts
    others = (as_bright.sum(0) - 1).float() / (uptake.shape[0] - 1)
    return others >= share


def spare_footprints(log_density: torch.Tensor, spared: torch.Tensor, factor: int, tau: float) -> torch.Tensor:
    """``log_density`` with every spared token's footprint raised above log(tau), so nothing there is flagged.

    Args:
        log_density: (*spatial) on the model grid.
        spared: (*latent) bool, latent = spatial / factor.
    """
    up = spared
    for d in range(spared.dim()):
        up = up.repeat_interleave(factor, dim=d)
    return torch.where(up, torch.clamp(log_density, min=math.log(tau) + 1.0), log_density)


def training_scan_generator(cfg: Config, k: int, i: int, device: torch.device) -> torch.Generator:
    """The random stream of iteration k's detection of training scan i (its own, so a resumed detection is the same)."""
    return torch.Generator(device=device).manual_seed(cfg.seed + 100003 * k + i)


def detect_stage(run: RunFolder, cfg: Config, k: int, data: TrainingSet, detectors: list[Detector],
                 threshold: float, reporter: Reporter, units: float) -> tuple[torch.Tensor, float]:
    """Binary maps of every training scan with iteration k's detector(s); returns token masks (M, L) and seconds.

    With one detector it scores every scan; with K (cross-fitting) scan i is scored by ``detectors[i mod K]``,
    the one fitted without it. Each scan's maps are written as soon as they exist, so an interrupted detection
    resumes scan by scan.
    """
    start = time.perf_counter()
    tau = cfg.iltm.mask_density_threshold
    dims = data.arrays[0].ndim - 1 if len(data) else None
    share = cfg.iltm.spare_share(dims) if cfg.data.intensity == "pet" else None  # bright anomalies only
    factor = cfg.vqvae.downsample_factor
    uptake = token_uptake(data.arrays, factor) if share is not None else None
    mine = dist.shard(list(range(len(data))))
    for i in reporter.track(mine, f"iteration {k}: detect on training scans", units=units, iteration=k):
        rec = data.records[i]
        token_path, mask_path = run.token_mask_path(k, rec.id), run.mask_path(k, rec.id)
        if token_path.is_file() and mask_path.is_file():
            continue
        detector = detectors[fold_of(i, len(detectors))]
        generator = training_scan_generator(cfg, k, i, detector.device)
        result = detector.detect_array(torch.from_numpy(data.arrays[i]), threshold, generator)
        if uptake is not None:
            latent = [s // factor for s in data.arrays[i].shape[1:]]
            spared = shared_uptake(uptake, i, share).reshape(latent)
            result.log_density = spare_footprints(result.log_density, spared, factor,
                                                  cfg.detection.density_threshold if tau is None else tau)
        binary = detector.binary_map(result.log_density, tau)
        _, mask_img = detector.maps_on_input_grid(result, data.infos[i], tau)
        write_image(mask_img, mask_path)
        with atomic_path(token_path) as tmp:
            np.save(tmp, detector.token_mask(binary).numpy().reshape(-1))
    dist.barrier()
    return load_token_masks(run, k, [r.id for r in data.records]), time.perf_counter() - start


def _trained_vqvae(run: RunFolder, cfg: Config, data: TrainingSet, history: dict[str, Any], device: torch.device,
                   reporter: Reporter, units: float) -> tuple[Any, dict, torch.Tensor, int]:
    """The run's VQ-VAE (trained now unless there) and its stored payload, its training-scan tokens and the number
    of codes they use."""
    if not run.vqvae_path.is_file():
        attempt = len(history.get("vqvae_attempts", []))
        history["vqvae"] = train_vqvae_stage(run, cfg, data, device, reporter, units=units, attempt=attempt)
        if dist.is_main():
            run.write_json(run.history_path, history)
            (run.root / "vqvae_checkpoint.pt").unlink(missing_ok=True)
    else:
        reporter.units_done += units
    vqvae, payload = load_vqvae(run.vqvae_path, map_location=device)
    tokens = tokenize_stage(run, data, vqvae, device, reporter)
    codes_used = int(torch.unique(tokens).numel())
    if isinstance(history.get("vqvae"), dict) and "codes_used" not in history["vqvae"]:
        history["vqvae"]["codes_used"] = codes_used
        if dist.is_main():
            run.write_json(run.history_path, history)
    return vqvae, payload, tokens, codes_used


def _set_aside(run: RunFolder, history: dict[str, Any], keep: int | None) -> None:
    """Move the current VQ-VAE (and its tokens) to ``vqvae_attempt<n>.pt``, recorded in ``vqvae_attempts``; with
    ``keep``, put set-aside attempt ``keep`` back in its place."""
    attempts = history.setdefault("vqvae_attempts", [])
    n = len(attempts) if keep is None else keep
    aside = run.root / f"vqvae_attempt{n}.pt"
    if dist.is_main():
        swap = run.root / "vqvae_swap.pt"
        if keep is not None:
            aside.replace(swap)
        run.vqvae_path.replace(aside)
        if keep is not None:
            swap.replace(run.vqvae_path)
        run.tokens_path.unlink(missing_ok=True)
    record = dict(history["vqvae"], file=aside.name)
    if keep is None:
        attempts.append(record)
    else:
        history["vqvae"], attempts[keep] = {k: v for k, v in attempts[keep].items() if k != "file"}, record
    if dist.is_main():
        run.write_json(run.history_path, history)
    dist.barrier()


def vqvae_stage(run: RunFolder, cfg: Config, data: TrainingSet, history: dict[str, Any], device: torch.device,
                reporter: Reporter) -> tuple[Any, dict, torch.Tensor, int]:
    """Train (or load) the VQ-VAE and tokenise the training scans; retrain a partly collapsed one from other
    initialisations up to ``vqvae.collapse_retries`` times and keep the one that uses the most codes."""
    enough = cfg.vqvae.num_embeddings * PARTIAL_COLLAPSE_SHARE
    retries = cfg.vqvae.retries_for(cfg.data.spatial_dims)
    trained = _trained_vqvae(run, cfg, data, history, device, reporter, units=3.0)
    codes_used = trained[3]
    while codes_used < enough and len(history.get("vqvae_attempts", [])) < retries:
        attempt = len(history.get("vqvae_attempts", [])) + 1
        reporter.warn(f"the VQ-VAE uses only {codes_used} of its {cfg.vqvae.num_embeddings} codes on the training "
                      f"scans; training it again from another initialisation (vqvae.collapse_retries, attempt "
                      f"{attempt + 1} of {retries + 1})")
        _set_aside(run, history, keep=None)
        if reporter.units_total is not None:
            reporter.units_total += 3.0
        trained = _trained_vqvae(run, cfg, data, history, device, reporter, units=3.0)
        codes_used = trained[3]
        if codes_used >= enough or len(history["vqvae_attempts"]) == retries:
            best = max(range(len(history["vqvae_attempts"])), key=lambda n: history["vqvae_attempts"][n]["codes_used"])
            if history["vqvae_attempts"][best]["codes_used"] > codes_used:
                reporter.log(f"keeping VQ-VAE attempt {best + 1}: it uses more codes than the last one")
                _set_aside(run, history, keep=best)
                trained = _trained_vqvae(run, cfg, data, history, device, reporter, units=0.0)
            break
    return trained


# -- label-free rules from the training cohort itself (opt-in, or recorded only) --------------------------------

def has_scoring_models(run: RunFolder, k: int, folds: int) -> bool:
    """Whether iteration k's Transformers that score the training cohort exist: its fold Transformers with
    cross-fitting (the full one may not have been fitted, ``iltm.full_transformers=used``), else the full one."""
    if folds:
        return all(run.fold_transformer_path(k, j).is_file() for j in range(folds))
    return run.transformer_path(k).is_file()


@torch.no_grad()
def cohort_token_probabilities(run: RunFolder, k: int, tokens: torch.Tensor, folds: int,
                               device: torch.device) -> tuple[torch.Tensor, str]:
    """(M, L) p(s_i | s_<i) of every training scan's own tokens under iteration k, and where they come from.

    With cross-fitting each scan is scored by its fold's Transformer, fitted without it ("held-out"): the full
    Transformer has seen every scan and would rate its own training tokens too likely. Without folds the full
    Transformer scores them ("in-sample").
    """
    if folds and has_scoring_models(run, k, folds):
        probs = torch.empty(tokens.shape, dtype=torch.float32)
        for j in range(folds):
            rows = torch.tensor([i for i in range(tokens.shape[0]) if fold_of(i, folds) == j])
            model = TokenTransformer.load(run.fold_transformer_path(k, j), map_location=device).eval()
            probs[rows] = _batched_probabilities(model, tokens[rows], device)
        return probs, "held-out"
    model = TokenTransformer.load(run.transformer_path(k), map_location=device).eval()
    return _batched_probabilities(model, tokens, device), "in-sample"


def scored_cohort(run: RunFolder, k: int, tokens: torch.Tensor, folds: int, device: torch.device,
                  cache: dict[int, tuple[torch.Tensor, str]] | None) -> tuple[torch.Tensor, str]:
    """:func:`cohort_token_probabilities`, kept in ``cache`` (iteration -> result) when one is given: a training
    process scores each iteration's cohort once, however often the label-free rules ask."""
    if cache is not None and k in cache:
        return cache[k]
    result = cohort_token_probabilities(run, k, tokens, folds, device)
    if cache is not None:
        cache[k] = result
    return result


def _batched_probabilities(model: TokenTransformer, tokens: torch.Tensor, device: torch.device,
                           batch: int = 8) -> torch.Tensor:
    """(M, L) token probabilities, ``batch`` rasters at a time: the logits of a whole cohort (M x L x V) at once
    would not fit in memory at whole-body sizes."""
    return torch.cat([model.token_probabilities(tokens[i:i + batch].to(device)).float().cpu()
                      for i in range(0, tokens.shape[0], batch)])


SHORTER_SCHEDULE_DIR = "shorter_epochs"  # iteration 0's fold fits of the shorter schedule, until one is chosen


def held_out_nll(run: RunFolder, tokens: torch.Tensor, folds: int, device: torch.device) -> float:
    """Mean NLL of every training token under iteration 0's fold Transformer that did not see its scan."""
    probs, _ = cohort_token_probabilities(run, 0, tokens, folds, device)
    return float(-torch.log(probs.double().clamp_min(1e-300)).mean())


def choose_epochs_stage(run: RunFolder, cfg: Config, tokens: torch.Tensor, history: dict[str, Any],
                        device: torch.device, reporter: Reporter) -> None:
    """``transformer.shorter_epochs``: fit iteration 0's fold Transformers for ``epochs`` and for the shorter
    schedule, keep the one whose held-out NLL of the training tokens is lower, and train the whole run with it.

    The choice goes to ``history.json`` (``transformer_epochs``) and the chosen epochs to ``config.yaml``, before the
    chosen fold fits replace the others, so that an interrupted run resumes with the choice it made.
    """
    folds, short, long = cfg.iltm.cross_fit_folds, cfg.transformer.shorter_for(cfg.data.spatial_dims), \
        cfg.transformer.epochs
    side = RunFolder(run.root / SHORTER_SCHEDULE_DIR)
    if "transformer_epochs" not in history:
        if not short or not folds:
            return
        reporter.log(f"iteration 0: fitting the fold Transformers for {long} and {short} epochs to choose the "
                     f"schedule (transformer.shorter_epochs)")
        if reporter.units_total is not None:
            reporter.units_total += 2.0  # both schedules' fold fits; the loop then finds the chosen ones
        cross_fit_stage(run, cfg, 0, tokens, None, device, reporter, units=1.0)
        short_cfg = copy.deepcopy(cfg)
        short_cfg.transformer.epochs = short
        cross_fit_stage(side, short_cfg, 0, tokens, None, device, reporter, units=1.0)
        nll = {long: held_out_nll(run, tokens, folds, device), short: held_out_nll(side, tokens, folds, device)}
        chosen = short if nll[short] < nll[long] else long
        history["transformer_epochs"] = {"epochs": chosen, "candidates": [long, short],
                                         "held_out_nll": {str(e): v for e, v in nll.items()}}
        cfg.transformer.epochs = chosen
        reporter.log(f"Transformer epochs: {chosen} (held-out NLL of the training tokens {nll[long]:.4f} after "
                     f"{long} epochs, {nll[short]:.4f} after {short})")
        if dist.is_main():
            cfg.save(run.config_path)  # every later fit (and a resumed run) reads the epochs from here
            run.write_json(run.history_path, history)
        dist.barrier()
    if dist.is_main() and side.root.is_dir():
        if history["transformer_epochs"]["epochs"] != history["transformer_epochs"]["candidates"][0]:
            for j in range(folds):
                if side.fold_transformer_path(0, j).is_file():
                    side.fold_transformer_path(0, j).replace(run.fold_transformer_path(0, j))
        shutil.rmtree(side.root)
    dist.barrier()


MIN_RESAMPLING_THRESHOLD = 1e-12  # a quantile of probabilities that underflowed stays a valid t


def adaptive_threshold(run: RunFolder, cfg: Config, tokens: torch.Tensor, device: torch.device,
                       cache: dict | None = None) -> dict[str, Any]:
    """``detection.resampling_quantile`` q: t = the q-quantile of the training scans' token probabilities under
    iteration 0 (held-out folds where there are some); returns the record for ``history.json``."""
    q = float(cfg.detection.quantile_for(cfg.data.spatial_dims))
    probs, source = scored_cohort(run, 0, tokens, cfg.iltm.cross_fit_folds, device, cache)
    t = max(float(np.quantile(probs.numpy().astype(np.float64).ravel(), q)), MIN_RESAMPLING_THRESHOLD)
    return {"resampling_quantile": q, "resampling_threshold": min(t, 1.0),
            "absolute_threshold": cfg.detection.resampling_threshold, "probabilities": source,
            "tokens": int(probs.numel())}


def select_iteration(run: RunFolder, cfg: Config, tokens: torch.Tensor, scan_ids: list[str],
                     device: torch.device, cache: dict | None = None) -> dict[str, Any]:
    """Which iteration to keep, without labels: the last one, unless its Transformer predicts the tokens that no
    iteration's masks flag (tokens every model agrees are normal) worse than iteration 0's did; then iteration 0.
    Each is scored on scans it did not see where cross-fitting allows. Masking normal tokens takes them out of the
    next Transformer's targets and context, so over-masking shows as a worse prediction of the plainly normal ones;
    masking anomalies removes what confuses the model and lowers it. Only the two ends are compared: the
    iterations in between are noisier than the gain they would pick out (docs/research.md, "ILTM never ends below
    its iteration 0").

    Returns:
        ``{"per_iteration": [{iteration, reference_nll, masked_fraction}], "reference_tokens", "probabilities",
        "best_iteration", "selection_reason"}``.
    """
    iterations = [k for k in run.mask_iterations() if has_scoring_models(run, k, cfg.iltm.cross_fit_folds)]
    masks = {k: load_token_masks(run, k, scan_ids) for k in iterations}
    flagged = torch.zeros(tokens.shape, dtype=torch.bool)
    for m in masks.values():
        flagged |= m
    reference = ~flagged
    rows, source = [], None
    for k in iterations:
        probs, source = scored_cohort(run, k, tokens, cfg.iltm.cross_fit_folds, device, cache)
        nll = -torch.log(probs.clamp_min(1e-12).double())
        mean = float(nll[reference].mean()) if bool(reference.any()) else None
        rows.append({"iteration": k, "reference_nll": mean, "masked_fraction": float(masks[k].float().mean())})
    best = kept_iteration(rows)
    if not rows:
        reason = "no finished iteration"
    elif not bool(reference.any()):
        reason = "every token was flagged by some iteration's masks, so none could judge the iterations: iteration 0"
    elif len(rows) == 1:
        reason = "only iteration 0 was trained"
    else:
        first, last = rows[0], rows[-1]
        nll = f"(mean NLL {last['reference_nll']:.4f} against {first['reference_nll']:.4f} at iteration 0)"
        if best == last["iteration"]:
            reason = f"the last iteration predicted the never-flagged tokens at least as well as iteration 0 {nll}"
        else:
            reason = (f"the last iteration predicted the never-flagged tokens worse than iteration 0 {nll} while "
                      f"the masks {mask_change(first['masked_fraction'], last['masked_fraction'])}: iteration 0")
    return {"per_iteration": rows, "reference_tokens": int(reference.sum()), "probabilities": source,
            "best_iteration": best, "selection_reason": reason}


def kept_iteration(rows: list[dict[str, Any]], tolerance: float = 0.0) -> int | None:
    """:func:`select_iteration`'s rule on its ``per_iteration`` rows (ascending): the last iteration unless its
    ``reference_nll`` is above iteration 0's (by more than ``tolerance`` of it: the bench compares other values;
    training uses 0); iteration 0 where there is nothing to compare (None: no rows)."""
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    if len(rows) == 1 or first["reference_nll"] is None or last["reference_nll"] is None:
        return 0
    return last["iteration"] if last["reference_nll"] <= first["reference_nll"] * (1.0 + tolerance) else 0


def mask_change(first: float, last: float) -> str:
    """How the masks went from covering ``first`` to ``last`` of the tokens, in words, e.g. "shrank from 0.70 % to
    0.69 % of the tokens": the direction is read from the percentages as printed."""
    a, b = f"{100 * first:.2f}", f"{100 * last:.2f}"
    if a == b:
        return f"stayed at {a} % of the tokens"
    return f"{'grew' if float(b) > float(a) else 'shrank'} from {a} % to {b} % of the tokens"


def load_token_masks(run: RunFolder, k: int, scan_ids: list[str]) -> torch.Tensor:
    """(M, L) bool: iteration k's stored training-scan token masks, one row per scan id (True = masked)."""
    rows = []
    for scan_id in scan_ids:
        path = run.token_mask_path(k, scan_id)
        try:
            rows.append(torch.from_numpy(np.load(path, allow_pickle=False)).reshape(-1).bool())
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(path, f"token mask is missing or damaged ({exc.__class__.__name__}); "
                                   f"'iltm train --resume {run.root}' redoes it") from None
    if len({r.numel() for r in rows}) > 1:
        raise InputError(run.iteration_dir(k) / "token_masks", "token masks of different lengths (damaged run)")
    return torch.stack(rows)


def iteration_files(run: RunFolder, k: int, scan_ids: list[str], folds: int, full: bool = True) -> list[Path]:
    """Every file a finished iteration k leaves: its Transformer(s) (the full-cohort one only when ``full``), and
    each scan's image and token mask."""
    paths = [run.transformer_path(k)] if full else []
    paths += [run.fold_transformer_path(k, j) for j in range(folds)]
    return paths + [p for i in scan_ids for p in (run.mask_path(k, i), run.token_mask_path(k, i))]


def verify_finished_steps(run: RunFolder, history: dict[str, Any], scan_ids: list[str], folds: int,
                          reporter: Reporter, full: bool = True) -> dict[str, Any]:
    """``history`` without the finished iterations whose files are not all present (and those after them), so
    ``--resume`` redoes them; files derived from what is gone are removed, those still valid are reused.

    A missing VQ-VAE invalidates every iteration (tokens come from it); a missing token mask of iteration k
    invalidates iterations after k (they were trained on it); a missing Transformer or image mask only k itself.
    Without ``full`` (``iltm.full_transformers=used``) the full-cohort Transformers are not iteration files: the
    one detection uses is fitted again after the loop when it is missing.
    """
    records = sorted(history["iterations"], key=lambda r: r["iteration"])
    if records and not run.vqvae_path.is_file():
        reporter.warn(f"{run.vqvae_path} is missing: training the VQ-VAE and every ILTM iteration again")
        if dist.is_main():
            run.tokens_path.unlink(missing_ok=True)
            for _, folder in run.iteration_dirs():
                shutil.rmtree(folder)
        history.update(vqvae=None, iterations=[], finished=False, stop_reason=None)
        return history
    for n, record in enumerate(records):
        k = record["iteration"]
        missing = [p for p in iteration_files(run, k, scan_ids, folds, full) if not p.is_file()]
        if not missing:
            continue
        shown = ", ".join(str(p.relative_to(run.root)) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        reporter.warn(f"iteration {k} is recorded as finished but {len(missing)} of its files are missing "
                      f"({shown}): redoing it")
        if any(p.parent.name == "token_masks" for p in missing) and dist.is_main():
            for later, folder in run.iteration_dirs():
                if later > k:
                    shutil.rmtree(folder)
        history.update(iterations=records[:n], finished=False, stop_reason=None)
        break
    return history


def full_fit_stage(run: RunFolder, cfg: Config, k: int, tokens: torch.Tensor, history: dict[str, Any],
                   scan_ids: list[str], device: torch.device, reporter: Reporter) -> None:
    """Fit iteration k's full-cohort Transformer after the loop unless it is there (``iltm.full_transformers=used``
    leaves it out of the loop). It is the model the loop would have fitted: the same seed, the same masks
    (iteration k - 1's), and nothing of the fold fits in between changes it."""
    if run.transformer_path(k).is_file():
        return
    masks = load_token_masks(run, k - 1, scan_ids) if k > 0 else None
    fitted = train_transformer_stage(run, cfg, k, tokens, masks, cfg.vqvae.num_embeddings, device, reporter,
                                     units=1.0)
    for record in history["iterations"]:
        if record["iteration"] == k:
            record.update(fitted)
    if dist.is_main():
        run.write_json(run.history_path, history)


# -- the loop --------------------------------------------------------------------------------------------------

def train(out: str | Path, cfg: Config | None = None, data: str | Path | None = None, resume: bool = False,
          skip_unreadable: bool = False, reporter: Reporter | None = None, full_fits: Iterable[int] = ()) -> RunFolder:
    """Train a run folder from scratch (``data`` + ``cfg``) or continue one (``resume=True``).

    ``full_fits``: iterations whose full-cohort Transformer to fit besides the one detection uses, where
    ``iltm.full_transformers=used`` leaves them out (a finished run only fits those).

    Returns the run folder; its ``history.json`` says why the loop stopped.
    """
    reporter = reporter or Reporter("bar")
    run = RunFolder(Path(out))
    if resume:
        if not run.manifest_path.is_file() or not run.config_path.is_file():
            raise InputError(run.root, "cannot resume: not a run folder (config.yaml or manifest.json missing)")
        cfg = run.config()
    elif cfg is None or data is None:
        raise ValueError("train() needs data and cfg unless resuming")
    # Join the process group first: under torchrun every rank runs this function, and only rank 0 writes.
    device = dist.init_from_env(resolve_device(cfg.device))
    if resume:
        records = [ImageRecord(id=r["id"], image=Path(r["image"]), label=None)
                   for r in run.manifest().get("images", [])]
        if not records:
            raise InputError(run.manifest_path, "cannot resume: the manifest lists no training scans")
        missing = [str(r.image) for r in records if not r.image.is_file()]
        if missing:
            raise InputError(run.root, f"cannot resume: training scans are gone: {', '.join(missing[:5])}")
        cfg.iltm.check_cohort(len(records), where=str(run.config_path))
    else:
        if run.root.exists() and any(run.root.iterdir()):
            raise InputError(run.root, "output folder is not empty (use --resume to continue a run there)")
        dist.barrier()  # every rank has checked the folder before rank 0 fills it
        records = gather_inputs(data, cfg, skip_unreadable, reporter)
        cfg.iltm.check_cohort(len(records), where="config")
        dims = read_image(records[0].image, units=cfg.data.units).GetDimension()
        if cfg.data.spatial_dims not in (None, dims):
            raise InputError(data, f"images are {dims}D but the config asks for spatial_dims={cfg.data.spatial_dims}")
        cfg.data.spatial_dims = dims
        # config.yaml records the values that apply to these scans
        cfg.iltm.spare_shared_uptake = cfg.iltm.spare_share(dims)
        cfg.iltm.select_iteration = cfg.iltm.selection_for(dims)
        cfg.iltm.max_iterations = cfg.iltm.iterations_for(dims)
        cfg.detection.resampling_quantile = cfg.detection.quantile_for(dims)
        cfg.vqvae.batch_size = cfg.vqvae.batch_for(dims)
        cfg.vqvae.max_steps = cfg.vqvae.max_steps_for(dims)
        cfg.vqvae.min_steps = cfg.vqvae.min_steps_for(dims)
        cfg.vqvae.collapse_retries = cfg.vqvae.retries_for(dims)
        cfg.transformer.shorter_epochs = cfg.transformer.shorter_for(dims)
        if cfg.data.spatial_size is None:
            cfg.data.spatial_size = model_grid_size(records, cfg)
        if dist.is_main():
            run.root.mkdir(parents=True, exist_ok=True)
            cfg.save(run.config_path)
            run.write_json(run.manifest_path, {"version": FORMAT_VERSION, "spatial_dims": dims,
                                               "spatial_size": cfg.data.spatial_size,
                                               "images": [{"id": r.id, "image": str(Path(r.image).resolve())}
                                                          for r in records]})
        dist.barrier()

    if cfg.iltm.spare_share(cfg.data.spatial_dims) is not None and cfg.data.intensity != "pet":
        reporter.warn(f"iltm.spare_shared_uptake acts only on PET intensities (bright lesions); with "
                      f"data.intensity={cfg.data.intensity!r} no flagged token is spared")
    seed_everything(cfg.seed)
    history = run.history()
    max_k = cfg.iltm.iterations_for(cfg.data.spatial_dims)
    # Work units for the overall progress fraction: VQ-VAE, then a Transformer fit and a detection per iteration.
    folds = cfg.iltm.cross_fit_folds
    every_full = cfg.iltm.fits_every_transformer()
    if resume:
        before = len(history["iterations"])
        history = verify_finished_steps(run, history, [r.id for r in records], folds, reporter, full=every_full)
        if len(history["iterations"]) != before and dist.is_main():
            run.write_json(run.history_path, history)
        dist.barrier()
    per_iteration = (3.0 if folds else 2.0) - (0.0 if every_full else 1.0)  # Transformer fit, (fold fits,) detection
    reporter.units_total = 3.0 + per_iteration * (max_k + 1) + (0.0 if every_full else 1.0 + len(set(full_fits)))
    reporter.emit("start", command="train", run=str(run.root), iterations=max_k + 1)

    data_set = TrainingSet(records, Preprocessor(cfg.data, cfg.vqvae.downsample_factor), reporter)
    vqvae, payload, tokens, codes_used = vqvae_stage(run, cfg, data_set, history, device, reporter)
    if codes_used < 2:
        reporter.warn(f"the VQ-VAE's codebook collapsed: every position of every training scan is code "
                      f"{int(tokens.flatten()[0])}, so the Transformer has nothing to learn and detection ranks "
                      f"voxels by their intensity alone. Train again with another --seed, more optimiser steps (a "
                      f"higher vqvae.min_steps: smaller batches) or vqvae.collapse_retries=1.")
    elif codes_used < cfg.vqvae.num_embeddings * PARTIAL_COLLAPSE_SHARE:
        reporter.warn(f"the VQ-VAE uses only {codes_used} of its {cfg.vqvae.num_embeddings} codes on the training "
                      f"scans (a partly collapsed codebook), which costs detection quality. Train again with another "
                      f"--seed, more optimiser steps (a higher vqvae.min_steps: smaller batches) or "
                      f"vqvae.collapse_retries=1 (another initialisation when this happens).")

    done = {rec["iteration"]: rec for rec in history["iterations"]}
    if 0 not in done:
        choose_epochs_stage(run, cfg, tokens, history, device, reporter)
    best_mode = cfg.iltm.selection_for(cfg.data.spatial_dims) == "best"
    quantile = cfg.detection.quantile_for(cfg.data.spatial_dims)
    previous_masks: torch.Tensor | None = None
    scores: dict[int, tuple[torch.Tensor, str]] = {}  # each iteration's cohort probabilities, scored once
    for k in range(max_k + 1):
        if k in done:
            previous_masks = load_token_masks(run, k, [r.id for r in records])
            reporter.units_done += per_iteration
            continue
        if history.get("finished"):
            break
        record: dict[str, Any] = {"iteration": k}
        if not every_full:
            pass  # fitted after the loop for the iteration detection uses (and those asked for)
        elif run.transformer_path(k).is_file():
            stored = TokenTransformer.load(run.transformer_path(k))
            record.update({"transformer_loss": (stored.extra or {}).get("losses", [None])[-1], "train_seconds": None})
            reporter.units_done += 1.0
        else:
            record.update(train_transformer_stage(run, cfg, k, tokens, previous_masks, cfg.vqvae.num_embeddings,
                                                  device, reporter, units=1.0))
        paths = [run.transformer_path(k)]
        if folds:
            record["fold_train_seconds"] = cross_fit_stage(run, cfg, k, tokens, previous_masks, device, reporter,
                                                           units=1.0)
            paths = [run.fold_transformer_path(k, j) for j in range(folds)]
        if k == 0 and quantile is not None and "adaptive_threshold" not in history:
            history["adaptive_threshold"] = adaptive_threshold(run, cfg, tokens, device, scores)
            cfg.detection.resampling_threshold = history["adaptive_threshold"]["resampling_threshold"]
            reporter.log(f"resampling threshold t = {cfg.detection.resampling_threshold:.5g}: the "
                         f"{quantile:g}-quantile of the training scans' token probabilities "
                         f"(detection.resampling_quantile)")
            if dist.is_main():
                cfg.save(run.config_path)  # detection reads t from here
        threshold = iteration_threshold(cfg, k)
        detectors = [Detector(cfg, vqvae, TokenTransformer.load(p, map_location=device), payload["latent_shape"],
                              device) for p in paths]
        masks, seconds = detect_stage(run, cfg, k, data_set, detectors, threshold, reporter, units=1.0)
        count = int(masks.sum())
        prev_count = int(previous_masks.sum()) if previous_masks is not None else None
        change = None if prev_count is None else abs(count - prev_count) / max(prev_count, 1)
        record.update({"resampling_threshold": threshold, "masked_tokens": count,
                       "masked_fraction": count / masks.numel(), "masked_change": change, "detect_seconds": seconds})
        history["iterations"].append(record)
        reporter.emit("iteration", **record)
        reporter.log(f"iteration {k}: t={threshold:.5f}, masked tokens {count} "
                     f"({100 * count / masks.numel():.2f} %)" + ("" if change is None else f", change {100 * change:.2f} %"))
        if change is not None and change < cfg.iltm.stop_change:
            history.update(finished=True, stop_reason=f"masked-token count changed {100 * change:.2f} % "
                                                      f"(< {100 * cfg.iltm.stop_change:g} %) at iteration {k}")
        elif k == max_k:
            history.update(finished=True, stop_reason=f"reached --max-iterations ({max_k})")
        if dist.is_main():
            run.write_json(run.history_path, history)
        previous_masks = masks
        if history.get("finished"):
            break
    if not history.get("finished"):
        history.update(finished=True, stop_reason=f"reached --max-iterations ({max_k})")
        if dist.is_main():
            run.write_json(run.history_path, history)
    if "best_iteration" not in history:
        selection = select_iteration(run, cfg, tokens, [r.id for r in records], device, scores)
        history.update(iteration_selection=selection, best_iteration=selection["best_iteration"],
                       selection_reason=selection["selection_reason"])
        if dist.is_main():
            run.write_json(run.history_path, history)
    reporter.log(f"iteration kept by the never-flagged tokens' likelihood: {history['best_iteration']} "
                 f"({history['selection_reason']})" + ("; detection uses it (iltm.select_iteration=best)"
                                                       if best_mode else ""))
    recorded = [r["iteration"] for r in history["iterations"]]
    used = history["best_iteration"] if best_mode and history["best_iteration"] in recorded else max(recorded)
    unknown = sorted(set(full_fits) - set(recorded))
    if unknown:
        raise InputError(run.root, f"cannot fit the full-cohort Transformer of iteration {unknown[0]}: the run's "
                                   f"finished iterations are {', '.join(map(str, recorded))}")
    for k in sorted({used} | set(full_fits)):
        full_fit_stage(run, cfg, k, tokens, history, [r.id for r in records], device, reporter)
    if history.get("detection_iteration") != used:
        history["detection_iteration"] = used
        if dist.is_main():
            run.write_json(run.history_path, history)
    reporter.log(f"training finished: {history['stop_reason']}")
    reporter.emit("done", run=str(run.root))
    return run
