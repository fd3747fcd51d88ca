"""KDE detection of one image (DESIGN.md step 3): likelihoods, healed samples, dropout decodes, per-voxel KDE."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers.utils import compute_importance_map

from . import kde
from .bundle import ModelBundle, open_model
from .config import Config, DetectionConfig
from .errors import InputError, WriteError
from .io import atomic_write_text, itk_name, read_image, write_image
from .layout import (DETECTION_RECORD, DICOM_SEG_SUFFIX, FORMAT_VERSION, LESIONS_SUFFIX, MASK_SUFFIX, OVERLAY_SUFFIX,
                     SCANS_TABLE, SCORE_SUFFIX, check_id)
from .preprocess import GeometryInfo, Preprocessor
from .precision import autocast
from .progress import Reporter
from .run import RunFolder
from .transformer import TokenTransformer
from .vqvae import encode_tokens, set_detection_mode


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a clear error, not a torch traceback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", f"'{device}' requested but no CUDA GPU is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError("--device", f"unknown device '{device}' (auto, cpu, cuda or cuda:N)")
    return torch.device(device)


@dataclass
class DetectionResult:
    """Maps on the model's (preprocessed) grid.

    Attributes:
        log_density: (*spatial) float32, log f(x) of the original intensity under the per-voxel KDE.
        token_probabilities: (L,) p(s_i | s_<i) of the image's own tokens.
        flagged: (L,) bool, tokens resampled (p < resampling threshold).
        seconds: wall time of the detection.
    """

    log_density: torch.Tensor
    token_probabilities: torch.Tensor
    flagged: torch.Tensor
    seconds: float

    @property
    def score(self) -> torch.Tensor:
        return -self.log_density


class Detector:
    """A trained VQ-VAE + Transformer pair, ready to score images.

    Args:
        cfg: the run's config; ``cfg.detection`` holds S, D, t, eps and tau.
        vqvae: MONAI VQVAE (put in detection mode here: dropout in the decoder only, codebook frozen).
        transformer: the iteration's TokenTransformer.
        latent_shape: token grid shape (*latent) for the model's input size.
        device: where to run.
    """

    def __init__(self, cfg: Config, vqvae, transformer: TokenTransformer, latent_shape, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.vqvae = vqvae.to(device)
        set_detection_mode(self.vqvae)
        self.transformer = transformer.to(device).eval()
        self.latent_shape = tuple(latent_shape)
        self.preprocessor = Preprocessor(cfg.data, cfg.vqvae.downsample_factor)

    @classmethod
    def from_run(cls, run: RunFolder | ModelBundle | str | Path, iteration: int | None = None, device: str = "auto",
                 detection: DetectionConfig | None = None) -> "Detector":
        """The detector of a run folder's or a model bundle's (``MODEL.zip``) iteration (default: the last)."""
        run = open_model(run)
        iteration = run.check_for_detection(iteration)
        cfg = run.config()
        if detection is not None:
            cfg = replace(cfg, detection=detection)
        dev = resolve_device(device)
        vqvae, payload = run.load_vqvae(map_location=dev)
        transformer = run.load_transformer(iteration, map_location=dev)
        detector = cls(cfg, vqvae, transformer, payload["latent_shape"], dev)
        detector.iteration = iteration
        return detector

    def autocast(self):
        """The context of detection's decoding and Transformer passes (``Config.precision``)."""
        return autocast(self.cfg.precision, self.device)

    @torch.no_grad()
    def detect_array(self, image: torch.Tensor, resampling_threshold: float | None = None,
                     generator: torch.Generator | None = None) -> DetectionResult:
        """Score one preprocessed image.

        Args:
            image: (1, *spatial) normalised intensities, spatial = the model's input size.
            resampling_threshold: t; defaults to ``cfg.detection.resampling_threshold``.
            generator: seeds the resampling (a seed per healed sequence) and the decoder's dropout; the same seed
                gives the same map whatever ran before.
        """
        det = self.cfg.detection
        t = det.resampling_threshold if resampling_threshold is None else resampling_threshold
        start = time.perf_counter()
        x = image.to(self.device, torch.float32)[None]                      # (1, 1, *spatial)
        tokens = encode_tokens(self.vqvae, x).reshape(-1)                    # (L,)
        with self.autocast():
            probs = self.transformer.token_probabilities(tokens[None])[0]   # (L,) float32 (softmax in float32)
        flagged = probs < t                                                  # (L,)
        steps = None if det.cuda_graphs else "eager"
        with self.autocast(), one_cpu_thread(self.device):
            healed = self.transformer.heal(tokens, flagged, det.samples, generator=generator,
                                           batch=self.heal_batch(flagged, steps), steps=steps)  # (S, L)
        healed = healed.reshape(det.samples, *self.latent_shape)
        # Each healed latent is decoded D times; dropout in the decoder makes the D decodes differ.
        latents = healed.repeat_interleave(det.dropout_passes, dim=0)       # (N, *latent), N = S x D
        # Dropout draws from torch's global RNG; seeding it from the generator inside a fork makes a scan's map
        # depend on the generator's seed only, not on whatever ran before in the process.
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        voxels = x[0, 0].numel()
        log_f = self.log_density(latents, x[0, 0], seed, self.decoder_batch(voxels),
                                 streamed=self.streams(latents.shape[0], voxels))
        return DetectionResult(log_density=log_f.float().cpu(), token_probabilities=probs.cpu(),
                               flagged=flagged.cpu(), seconds=time.perf_counter() - start)

    def heal_batch(self, flagged: torch.Tensor, steps: str | None = None) -> int:
        """Sequences healed at once with ``steps`` (:data:`~iltm.transformer.HEAL_STEPS`, None: the default here): as
        many as fit ``stream_above_mb`` (:meth:`TokenTransformer.heal_bytes` each, in the autocast context healing
        runs in), at least 1, at most S. The draws do not depend on it."""
        det = self.cfg.detection
        per_sequence = self.transformer.heal_bytes(flagged, steps)
        if per_sequence == 0:
            return det.samples
        return max(1, min(det.samples, int(det.stream_above_mb * 2 ** 20 // per_sequence)))

    @staticmethod
    def reconstruction_bytes(n: int, voxels: int) -> int:
        """Memory of n float32 reconstructions of ``voxels`` voxels held at once."""
        return 4 * n * voxels

    def decoder_bytes(self, voxels: int) -> float:
        """The decoder's largest activations for one reconstruction: a few float32 tensors of the first level's
        channels at half resolution."""
        return 4 * 4 * self.cfg.vqvae.channels[0] * voxels / 2 ** len(self.latent_shape)

    def streams(self, n: int, voxels: int) -> bool:
        """Whether the KDE of n reconstructions is streamed: when they and one reconstruction's decoder activations
        (held while the next batch decodes) do not fit ``stream_above_mb`` together."""
        budget = self.cfg.detection.stream_above_mb * 2 ** 20
        return self.reconstruction_bytes(n, voxels) + self.decoder_bytes(voxels) > budget

    def decoder_batch(self, voxels: int) -> int:
        """Reconstructions per decoder call: ``decode_batch``, fewer where their decoder activations would not fit
        ``stream_above_mb``; at least 1."""
        det = self.cfg.detection
        return max(1, min(det.decode_batch, int(det.stream_above_mb * 2 ** 20 // self.decoder_bytes(voxels))))

    def decode_batches(self, latents: torch.Tensor, seed: int | None, batch: int, visit) -> None:
        """Decode (N, *latent) token grids in batches of ``batch`` and call ``visit((b, *spatial) float32)`` on each,
        in order. Dropout draws from the global RNG seeded with ``seed`` inside a fork (None: as it stands), so two
        calls with the same seed and batch give the same reconstructions."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, latents.shape[0], batch):
                with self.autocast():
                    recon = self.vqvae.decode_samples(latents[i:i + batch])  # (b, 1, *spatial)
                visit(recon[:, 0].float())

    @torch.no_grad()
    def log_density(self, latents: torch.Tensor, image: torch.Tensor, seed: int | None, batch: int,
                    streamed: bool = False) -> torch.Tensor:
        """log f of ``image`` (*spatial) under the KDE of the decodes of ``latents`` (N, *latent), decoded ``batch``
        at a time with dropout seeded by ``seed`` (see :meth:`decode_batches`).

        In memory: all N reconstructions at once, then :func:`kde.log_density` (the reference). Streamed: decoded
        twice in batches with the same dropout draws, the KDE accumulated by :class:`kde.StreamedLogDensity`, so
        memory does not grow with N (the same map to float32 rounding, at twice the decoding).
        """
        det = self.cfg.detection
        if not streamed:
            parts = []
            self.decode_batches(latents, seed, batch, parts.append)
            recon = torch.cat(parts, dim=0)                                  # (N, *spatial)
            return kde.log_density(recon, image, self.cfg.eps(), chunk_voxels=det.kde_chunk_voxels)
        if seed is None:  # the second pass must replay the first one's dropout draws
            seed = int(torch.randint(0, 2 ** 62, (1,)))
        estimate = kde.StreamedLogDensity(image, self.cfg.eps(), chunk_voxels=det.kde_chunk_voxels)
        self.decode_batches(latents, seed, batch, estimate.add_moments)
        self.decode_batches(latents, seed, batch, estimate.add_kernels)
        return estimate.result()

    def density_threshold(self, tau: float | None = None) -> float:
        """tau: the given one, else ``detection.density_threshold``."""
        return self.cfg.detection.density_threshold if tau is None else tau

    def binary_map(self, log_density: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """f < tau on the model grid, (*spatial) bool; tau defaults to ``detection.density_threshold``."""
        return kde.binary_map(log_density, self.density_threshold(tau)).bool()

    def token_mask(self, binary: torch.Tensor) -> torch.Tensor:
        """(*spatial) bool -> (*latent) bool: a token is masked when any voxel of its footprint is anomalous."""
        return token_mask_from_map(binary, self.cfg.vqvae.downsample_factor)

    def maps_on_input_grid(self, result: DetectionResult, info,
                           tau: float | None = None) -> tuple[sitk.Image, sitk.Image]:
        """(score, mask) images with exactly the input's size, spacing, origin and direction.

        The mask is the thresholded *resampled* score, so ``mask == (score > -ln tau)`` holds on the input grid
        (what the Slicer threshold slider relies on); tau defaults to ``detection.density_threshold``.
        """
        score = self.preprocessor.inverse(result.score.numpy().astype(np.float32), info, interpolator="linear")
        score = sitk.Cast(score, sitk.sitkFloat32)
        mask = sitk.Cast(score > -math.log(self.density_threshold(tau)), sitk.sitkUInt8)
        mask.CopyInformation(score)
        return score, mask

    def prepare(self, img: sitk.Image, where: str = "image") -> tuple[np.ndarray, GeometryInfo]:
        """The model's input of a SimpleITK image: a (1, *spatial) float32 array and the geometry that undoes it.

        Uses no model, so a cohort's next scan can be prepared while the current one is scored. A scan larger than
        the model's input grid (after resampling) is prepared uncropped, for :meth:`detect_prepared` to score in
        tiles. ``where`` names the image in errors (its file path).
        """
        array, info = self.preprocessor.forward(img, where=where)
        if any(g > s for g, s in zip(info.grid_size, info.spatial_size)):  # the model grid would crop the scan
            full = Preprocessor(replace(self.cfg.data, spatial_size=None), self.cfg.vqvae.downsample_factor)
            array, info = full.forward(img, where=where)
        return array, info

    def detect_prepared(self, array: np.ndarray, info: GeometryInfo, resampling_threshold: float | None = None,
                        generator: torch.Generator | None = None):
        """Score what :meth:`prepare` returned; returns (score image, mask image, result) on the input's grid.

        An array larger than the model's input grid on some axis is scored in model-sized windows that together
        cover it, so no part of the scan is left unscored; overlapping windows blend their log densities
        (``_detect_tiles``).
        """
        model_shape = None if self.cfg.data.spatial_size is None else tuple(self.cfg.data.spatial_size[::-1])
        if model_shape is not None and any(a > m for a, m in zip(array.shape[1:], model_shape)):
            result = self._detect_tiles(array, model_shape, resampling_threshold, generator)
        else:
            result = self.detect_array(torch.from_numpy(np.ascontiguousarray(array)), resampling_threshold,
                                       generator)
        score, mask = self.maps_on_input_grid(result, info)
        return score, mask, result

    def detect_image(self, img: sitk.Image, resampling_threshold: float | None = None,
                     generator: torch.Generator | None = None, where: str = "image"):
        """Score a SimpleITK image (:meth:`prepare`, then :meth:`detect_prepared`); returns (score image, mask image,
        result) on the input's grid. ``where`` names the image in errors (its file path)."""
        array, info = self.prepare(img, where=where)
        return self.detect_prepared(array, info, resampling_threshold, generator)

    def _detect_tiles(self, array: np.ndarray, model_shape: tuple[int, ...], resampling_threshold: float | None,
                      generator: torch.Generator | None) -> DetectionResult:
        """Detection over model-sized windows of a (1, *spatial) array larger than the model grid on some axis.

        Windows overlap by ``detection.tile_overlap`` of their size and their log densities are blended with MONAI's
        Gaussian importance map (sliding-window inference's "gaussian" mode), which falls off towards a window's
        edges, where the decoder sees zero padding instead of the scan.
        """
        padded_shape = tuple(max(a, m) for a, m in zip(array.shape[1:], model_shape))
        padded = np.zeros((1, *padded_shape), np.float32)
        padded[(slice(None), *[slice(0, a) for a in array.shape[1:]])] = array
        starts = [window_starts(n, m, self.cfg.detection.tile_overlap) for n, m in zip(padded_shape, model_shape)]
        # MONAI clamps its map at 1e-3 of the peak; clamped per axis and multiplied, an axis on which windows do not
        # overlap contributes a common factor that cancels, rather than flattening every weight near a scan's edge.
        weight = torch.ones(())
        for m in model_shape:
            axis = compute_importance_map((m,), mode="gaussian", sigma_scale=0.125, dtype=torch.float64)  # (m,)
            weight = weight[..., None] * axis                                # (*model) > 0 everywhere
        total = torch.zeros(padded_shape, dtype=torch.float64)
        weights = torch.zeros(padded_shape, dtype=torch.float64)
        flagged, probs, seconds = [], [], 0.0
        for corner in itertools.product(*starts):
            window = tuple(slice(c, c + m) for c, m in zip(corner, model_shape))
            part = self.detect_array(torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *window)])),
                                     resampling_threshold, generator)
            total[window] += weight * part.log_density.double()
            weights[window] += weight
            flagged.append(part.flagged)
            probs.append(part.token_probabilities)
            seconds += part.seconds
        log_f = (total / weights)[tuple(slice(0, a) for a in array.shape[1:])].float()
        return DetectionResult(log_density=log_f, token_probabilities=torch.cat(probs), flagged=torch.cat(flagged),
                               seconds=seconds)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """On a CPU, torch's intra-op threads set to one for the block, then back. Healing makes one small model call
    per flagged token (S rows): threads hardly split such calls, and where another process holds a core every call
    waits for the slowest thread (docs/research.md, "Where a CPU run's time goes")."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def window_starts(n: int, m: int, overlap: float) -> list[int]:
    """Starts of windows of m voxels that cover n >= m voxels with neighbours overlapping by about ``overlap`` of a
    window: a step of m (1 - overlap) (at least 1), the last window flush with the end."""
    step = max(1, int(m * (1.0 - overlap)))
    return sorted({*range(0, n - m, step), n - m})


def token_mask_from_map(binary: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool a binary map over each token's footprint (factor^dims voxels).

    Args:
        binary: (*spatial) bool or 0/1, spatial divisible by ``factor``.
        factor: total downsampling of the VQ-VAE (2 ** levels).

    Returns:
        (*spatial / factor) bool.
    """
    pool = F.max_pool2d if binary.dim() == 2 else F.max_pool3d
    return pool(binary.float()[None, None], kernel_size=factor, stride=factor)[0, 0] > 0


# Scans read and prepared in a background thread while the current one is scored (0: read each when its turn comes).
READ_AHEAD = 1


def scan_outputs(out: Path, scan_id: str, dims: int, png: bool = True, lesions: bool = False,
                 dicom_seg: bool = False) -> dict[str, Path]:
    """The files :func:`detect_files` writes for one ``dims``-D scan, by kind: score, mask, and as asked overlay
    (2D only), lesions, dicom_seg."""
    paths = {"score": out / f"{scan_id}{SCORE_SUFFIX}", "mask": out / f"{scan_id}{MASK_SUFFIX}"}
    if png and dims == 2:
        paths["overlay"] = out / f"{scan_id}{OVERLAY_SUFFIX}"
    if lesions:
        paths["lesions"] = out / f"{scan_id}{LESIONS_SUFFIX}"
    if dicom_seg:
        paths["dicom_seg"] = out / f"{scan_id}{DICOM_SEG_SUFFIX}"
    return paths


def saved_outputs(out: Path, scan_id: str, png: bool = True, lesions: bool = False,
                  dicom_seg: bool = False) -> dict[str, Path] | None:
    """The scan's :func:`scan_outputs` when every one of them is there already, else None. Outputs are written
    atomically, so a file that is there is whole; the score map's header tells the scan's dimension."""
    score = out / f"{scan_id}{SCORE_SUFFIX}"
    if not score.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(itk_name(score))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    paths = scan_outputs(out, scan_id, reader.GetDimension(), png, lesions, dicom_seg)
    return paths if all(p.is_file() for p in paths.values()) else None


def record_settings(out: Path, settings: dict, resume: bool = False, write: bool = True) -> Path:
    """Write ``out/detect.json``: what made the maps in ``out`` (``settings``: model, iteration, detection settings,
    seed...). With ``resume``, first check that the record already there says the same, so that a resumed folder
    never mixes maps of two models or settings: a difference is an InputError naming each changed setting. Only the
    writing process (``write``; rank 0 under torchrun) writes; every process checks."""
    import json

    settings = json.loads(json.dumps(settings))  # as JSON gives it back (tuples become lists)
    path = out / DETECTION_RECORD
    if resume and path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(path, f"cannot be read ({exc.__class__.__name__}); remove it, or leave out --resume "
                                   "to score every scan again") from None
        earlier = earlier if isinstance(earlier, dict) else {}
        changed = [f"{key} {earlier.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if earlier.get(key) != value]
        if changed:
            raise InputError(path, f"the maps there were made with other settings ({', '.join(changed)}); give "
                                   "another --out, or leave out --resume to score every scan again")
    if write:
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def detection_settings(model: str, iteration: int, detection: DetectionConfig, seed: int, unit: str) -> dict:
    """The record :func:`record_settings` keeps: everything that changes a detect folder's maps and tables."""
    import dataclasses

    return {"format_version": FORMAT_VERSION, "model": model, "iteration": iteration, "seed": seed, "units": unit,
            **{f"detection.{key}": value for key, value in dataclasses.asdict(detection).items()}}


def read_ahead(items: list, load: Callable[[Any], Any], ahead: int) -> Iterator[tuple[Any, Callable[[], Any]]]:
    """``(item, outcome)`` for each item in order, where ``outcome()`` returns ``load(item)`` or raises what it
    raised; with ``ahead`` > 0 the next ``ahead`` items are loaded by one background thread meanwhile."""
    if ahead <= 0:
        for item in items:
            yield item, partial(load, item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iltm-read-ahead")
    try:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(load, item).result))
            if len(pending) > ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # stopped early (an error, Ctrl-C): nothing more is read
        pool.shutdown(wait=True, cancel_futures=True)


def detect_files(detector: Detector, records, out: Path, reporter: Reporter, seed: int = 0,
                 png: bool = True, lesions: bool = False, dicom_seg_sources: dict | None = None,
                 split_lesions: bool = False, unit: str = "SUV", resume: bool = False) -> list[str]:
    """Detect every record into ``out``; returns the problems (one line each) of the inputs that failed.

    Writes ``<id>_score.nii.gz``, ``<id>_mask.nii.gz`` and, for 2D, a PNG overlay per scan; with ``lesions`` also
    ``<id>_lesions.csv`` per scan and one ``scans.csv`` (totals and scan score of every scan scored) for the
    folder; with ``dicom_seg_sources`` (record id -> its series' files in slice order) ``<id>_seg.dcm``, one
    segment or one per region with ``split_lesions``. A scan's outputs are all written or none is. ``unit``
    labels the PET values in the tables. Each scan's resampling is seeded with ``seed``. With ``resume`` a scan
    whose outputs are all there already is not scored again (its totals still go into ``scans.csv``).

    The next scan is read and prepared while the current one is scored (``READ_AHEAD``). Under torchrun each rank
    scores its share of the records; every rank returns all the problems, and rank 0 writes ``scans.csv``.
    """
    from . import distributed
    from . import lesions as lesions_mod

    wanted = dict(png=png, lesions=lesions, dicom_seg=dicom_seg_sources is not None)

    def load(item):
        """("skipped", its outputs, totals or None) for a scan with all its outputs, else ("scan", image, array,
        info)."""
        _, rec = item
        saved = saved_outputs(out, rec.id, **wanted) if resume else None
        img = read_image(rec.image, units=detector.cfg.data.units) if saved is None or lesions else None
        if saved is not None:
            totals = None
            if lesions:  # recomputed from the maps it has, so scans.csv is what an uninterrupted run writes
                totals = lesions_mod.lesions_of_images(img, read_image(saved["mask"]), read_image(saved["score"]),
                                                       str(saved["mask"]), str(saved["score"]))[1]
            return "skipped", saved, totals
        return ("scan", img, *detector.prepare(img, where=str(rec.image)))

    mine = distributed.shard(list(enumerate(records)))
    outcomes = []  # (record index, problem or None, (id, totals) or None) of this rank's scans
    for (index, rec), outcome in reporter.track(read_ahead(mine, load, READ_AHEAD), "detect", total=len(mine),
                                                units=1.0):
        try:
            loaded = outcome()
            if loaded[0] == "skipped":
                _, paths, totals = loaded
                reporter.log(f"{rec.id}: skipped (outputs complete)")
            else:
                _, img, array, info = loaded
                generator = torch.Generator(device=detector.device).manual_seed(seed)
                score, mask, result = detector.detect_prepared(array, info, generator=generator)
                check_id(rec.id, str(rec.image))
                paths = scan_outputs(out, rec.id, img.GetDimension(), **wanted)
                totals = _write_scan(rec.id, img, score, mask, result, paths, unit,
                                     None if dicom_seg_sources is None else dicom_seg_sources[rec.id],
                                     split_lesions, reporter)
        except WriteError:  # a full disk or a read-only folder stops the command
            raise
        except InputError as exc:  # an unreadable scan, a SEG its series cannot carry...: the next scan goes on
            outcomes.append((index, str(exc), None))
            continue
        for kind, path in paths.items():
            reporter.emit("output", kind=kind, path=str(path), id=rec.id)
        outcomes.append((index, None, (rec.id, totals) if lesions else None))
    outcomes = sorted(distributed.all_gather(outcomes), key=lambda o: o[0])
    scans = [o[2] for o in outcomes if o[2] is not None]
    if lesions and scans and distributed.is_main():
        scans_path = out / SCANS_TABLE
        atomic_write_text(scans_path, lesions_mod.csv_text(*lesions_mod.scan_rows(scans, unit)))
        reporter.emit("output", kind="scans", path=str(scans_path))
    return [o[1] for o in outcomes if o[1] is not None]


def _write_scan(scan_id: str, img: sitk.Image, score: sitk.Image, mask: sitk.Image, result: DetectionResult,
                paths: dict[str, Path], unit: str, seg_source: list | None, split_lesions: bool, reporter: Reporter):
    """Write one scored scan's ``paths`` (from :func:`scan_outputs`), all or none, and log its line; returns its
    lesion totals (None without a lesions table)."""
    from . import lesions as lesions_mod

    totals = None
    line = (f"{scan_id}: {int(result.flagged.sum())}/{result.flagged.numel()} tokens resampled, "
            f"{int(sitk.GetArrayViewFromImage(mask).sum())} anomalous voxels, {result.seconds:.1f} s")
    written: list[Path] = []
    try:  # a scan's outputs are all there or none is: a failed write takes back the ones before it
        for image, kind in ((score, "score"), (mask, "mask")):
            write_image(image, paths[kind])
            written.append(paths[kind])
        if "overlay" in paths:
            from .visualize import save_overlay_png

            save_overlay_png(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(score),
                             sitk.GetArrayFromImage(mask), paths["overlay"], title=scan_id)
            written.append(paths["overlay"])
        if "lesions" in paths:
            found, totals = lesions_mod.lesions_of_images(img, mask, score)
            atomic_write_text(paths["lesions"], lesions_mod.csv_text(*lesions_mod.lesion_rows(found, unit, True)))
            written.append(paths["lesions"])
            line += f", {totals.lesion_count} lesions, MTV {totals.mtv_ml:.2f} mL"
        if "dicom_seg" in paths:
            from .dicom_seg import write_dicom_seg

            write_dicom_seg(sitk.GetArrayFromImage(mask), seg_source, paths["dicom_seg"], split_lesions)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    reporter.log(line)
    return totals
