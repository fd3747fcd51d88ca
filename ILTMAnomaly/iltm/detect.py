"""KDE detection of one image (DESIGN.md step 3): likelihoods, healed samples, dropout decodes, per-voxel KDE."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import kde
from .bundle import ModelBundle, open_model
from .config import Config, DetectionConfig
from .errors import InputError, WriteError
from .io import atomic_write_text, read_image, write_image
from .layout import (DICOM_SEG_SUFFIX, LESIONS_SUFFIX, MASK_SUFFIX, OVERLAY_SUFFIX, SCANS_TABLE, SCORE_SUFFIX,
                     check_id)
from .preprocess import Preprocessor
from .progress import Reporter
from .run import RunFolder
from .transformer import TokenTransformer
from .vqvae import decode_tokens, encode_tokens, set_detection_mode


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

    @torch.no_grad()
    def detect_array(self, image: torch.Tensor, resampling_threshold: float | None = None,
                     generator: torch.Generator | None = None) -> DetectionResult:
        """Score one preprocessed image.

        Args:
            image: (1, *spatial) normalised intensities, spatial = the model's input size.
            resampling_threshold: t; defaults to ``cfg.detection.resampling_threshold``.
            generator: seeds the multinomial resampling and the decoder's dropout; the same seed gives the same
                map whatever ran before.
        """
        det = self.cfg.detection
        t = det.resampling_threshold if resampling_threshold is None else resampling_threshold
        start = time.perf_counter()
        x = image.to(self.device, torch.float32)[None]                      # (1, 1, *spatial)
        tokens = encode_tokens(self.vqvae, x).reshape(-1)                    # (L,)
        probs = self.transformer.token_probabilities(tokens[None])[0]       # (L,)
        flagged = probs < t                                                  # (L,)
        healed = self.transformer.heal(tokens, flagged, det.samples, generator=generator)  # (S, L)
        healed = healed.reshape(det.samples, *self.latent_shape)
        # Each healed latent is decoded D times; dropout in the decoder makes the D decodes differ.
        latents = healed.repeat_interleave(det.dropout_passes, dim=0)       # (N, *latent), N = S x D
        # Dropout draws from torch's global RNG; seeding it from the generator inside a fork makes a scan's map
        # depend on the generator's seed only, not on whatever ran before in the process.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)))
            recon = decode_tokens(self.vqvae, latents, batch=det.decode_batch)[:, 0]  # (N, *spatial)
        log_f = kde.log_density(recon, x[0, 0], self.cfg.eps(), chunk_voxels=det.kde_chunk_voxels)
        return DetectionResult(log_density=log_f.float().cpu(), token_probabilities=probs.cpu(),
                               flagged=flagged.cpu(), seconds=time.perf_counter() - start)

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

    def detect_image(self, img: sitk.Image, resampling_threshold: float | None = None,
                     generator: torch.Generator | None = None, where: str = "image"):
        """Score a SimpleITK image; returns (score image, mask image, result) on the input's grid.

        A scan larger than the model's input grid (after resampling) is scored in model-sized tiles that together
        cover it, so no part of it is left unscored; overlapping tiles average their log densities.
        ``where`` names the image in errors (its file path).
        """
        array, info = self.preprocessor.forward(img, where=where)
        if all(g <= s for g, s in zip(info.grid_size, info.spatial_size)):
            result = self.detect_array(torch.from_numpy(np.ascontiguousarray(array)), resampling_threshold,
                                       generator)
        else:  # the model grid would crop the scan: preprocess it uncropped and score it in tiles
            full = Preprocessor(replace(self.cfg.data, spatial_size=None), self.cfg.vqvae.downsample_factor)
            array, info = full.forward(img, where=where)
            result = self._detect_tiles(array, tuple(self.cfg.data.spatial_size[::-1]), resampling_threshold,
                                        generator)
        score, mask = self.maps_on_input_grid(result, info)
        return score, mask, result

    def _detect_tiles(self, array: np.ndarray, model_shape: tuple[int, ...], resampling_threshold: float | None,
                      generator: torch.Generator | None) -> DetectionResult:
        """Detection over model-sized windows of a (1, *spatial) array larger than the model grid on some axis."""
        padded_shape = tuple(max(a, m) for a, m in zip(array.shape[1:], model_shape))
        padded = np.zeros((1, *padded_shape), np.float32)
        padded[(slice(None), *[slice(0, a) for a in array.shape[1:]])] = array
        # Window starts per axis: every model-size step, the last one flush with the end.
        starts = [sorted({*range(0, n - m, m), n - m}) for n, m in zip(padded_shape, model_shape)]
        total = torch.zeros(padded_shape, dtype=torch.float64)
        count = torch.zeros(padded_shape, dtype=torch.float64)
        flagged, probs, seconds = [], [], 0.0
        for corner in itertools.product(*starts):
            window = tuple(slice(c, c + m) for c, m in zip(corner, model_shape))
            part = self.detect_array(torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *window)])),
                                     resampling_threshold, generator)
            total[window] += part.log_density.double()
            count[window] += 1
            flagged.append(part.flagged)
            probs.append(part.token_probabilities)
            seconds += part.seconds
        log_f = (total / count)[tuple(slice(0, a) for a in array.shape[1:])].float()
        return DetectionResult(log_density=log_f, token_probabilities=torch.cat(probs), flagged=torch.cat(flagged),
                               seconds=seconds)


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


def detect_files(detector: Detector, records, out: Path, reporter: Reporter, seed: int = 0,
                 png: bool = True, lesions: bool = False, dicom_seg_sources: dict | None = None,
                 split_lesions: bool = False, unit: str = "SUV") -> list[str]:
    """Detect every record into ``out``; returns the problems (one line each) of the inputs that failed.

    Writes ``<id>_score.nii.gz``, ``<id>_mask.nii.gz`` and, for 2D, a PNG overlay per scan; with ``lesions`` also
    ``<id>_lesions.csv`` per scan and one ``scans.csv`` (totals and scan score of every scan scored) for the
    folder; with ``dicom_seg_sources`` (record id -> its series' files in slice order) ``<id>_seg.dcm``, one
    segment or one per region with ``split_lesions``. A scan's outputs are all written or none is. ``unit``
    labels the PET values in the tables. Each scan's resampling is seeded with ``seed``.
    """
    from . import lesions as lesions_mod

    problems, scans = [], []
    for rec in reporter.track(records, "detect", units=1.0):
        try:
            img = read_image(rec.image, units=detector.cfg.data.units)
            generator = torch.Generator(device=detector.device).manual_seed(seed)
            score, mask, result = detector.detect_image(img, generator=generator, where=str(rec.image))
        except InputError as exc:
            problems.append(str(exc))
            continue
        check_id(rec.id, str(rec.image))
        score_path, mask_path = out / f"{rec.id}{SCORE_SUFFIX}", out / f"{rec.id}{MASK_SUFFIX}"
        png_path = out / f"{rec.id}{OVERLAY_SUFFIX}" if png and img.GetDimension() == 2 else None
        table_path = out / f"{rec.id}{LESIONS_SUFFIX}" if lesions else None
        seg_path = out / f"{rec.id}{DICOM_SEG_SUFFIX}" if dicom_seg_sources is not None else None
        flagged = int(result.flagged.sum())
        line = (f"{rec.id}: {flagged}/{result.flagged.numel()} tokens resampled, "
                f"{int(sitk.GetArrayViewFromImage(mask).sum())} anomalous voxels, {result.seconds:.1f} s")
        written: list[Path] = []
        try:  # a scan's outputs are all there or none is: a failed write takes back the ones before it
            for image, path in ((score, score_path), (mask, mask_path)):
                write_image(image, path)
                written.append(path)
            if png_path is not None:
                from .visualize import save_overlay_png

                save_overlay_png(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(score),
                                 sitk.GetArrayFromImage(mask), png_path, title=rec.id)
                written.append(png_path)
            if table_path is not None:
                found, totals = lesions_mod.lesions_of_images(img, mask, score)
                atomic_write_text(table_path, lesions_mod.csv_text(*lesions_mod.lesion_rows(found, unit, True)))
                written.append(table_path)
                line += f", {totals.lesion_count} lesions, MTV {totals.mtv_ml:.2f} mL"
            if seg_path is not None:
                from .dicom_seg import write_dicom_seg

                write_dicom_seg(sitk.GetArrayFromImage(mask), dicom_seg_sources[rec.id], seg_path, split_lesions)
        except WriteError:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        except InputError as exc:  # e.g. a SEG the source series cannot carry: this scan fails, the next goes on
            for path in written:
                path.unlink(missing_ok=True)
            problems.append(str(exc))
            continue
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        for kind, path in (("score", score_path), ("mask", mask_path), ("overlay", png_path),
                           ("lesions", table_path), ("dicom_seg", seg_path)):
            if path is not None:
                reporter.emit("output", kind=kind, path=str(path), id=rec.id)
        if table_path is not None:
            scans.append((rec.id, totals))
        reporter.log(line)
    if lesions and scans:
        scans_path = out / SCANS_TABLE
        atomic_write_text(scans_path, lesions_mod.csv_text(*lesions_mod.scan_rows(scans, unit)))
        reporter.emit("output", kind="scans", path=str(scans_path))
    return problems
