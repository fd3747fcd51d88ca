"""Model bundles: one zip with what detection needs, to share a trained model without its training scans.

``export_bundle`` copies a run's config, its VQ-VAE and one iteration's Transformer into a zip (names and version in
:mod:`iltm.layout`) and describes them in ``metadata.json``. The checkpoints are written again with their weights,
configs and shapes only: the run folder's manifest (absolute paths of the training scans), tokens, masks, history
and the checkpoints' training extras stay behind. :class:`ModelBundle` reads a bundle the way
:class:`~iltm.run.RunFolder` reads a run folder, so ``iltm detect --run`` and ``Detector.from_run`` take either.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import zipfile
from pathlib import Path

import SimpleITK as sitk

from . import __version__
from . import config as config_mod
from .checkpoint import checkpoint_bytes
from .errors import InputError
from .io import atomic_path
from .layout import (BUNDLE_FORMAT, BUNDLE_METADATA, BUNDLE_VERSION, CONFIG, FORMAT_VERSION, TRANSFORMER, VQVAE,
                     is_bundle, read_bundle_metadata)
from .run import RunFolder

# The DICOM modality a model of each intensity normalisation is for ("pet": PET, clipped then scaled); None: any.
MODALITY = {"pet": "PT", "unit8bit": None, "8bit": None, "none": None}


def _package_versions() -> dict:
    import monai
    import numpy
    import torch

    return {"iltm": __version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": numpy.__version__,
            "SimpleITK": sitk.Version_VersionString(), "python": platform.python_version()}


def _training_spacing(run: RunFolder) -> list | None:
    """Median voxel spacing (mm, x-y(-z)) of the training scans, from their headers; None when none is readable.

    Only this summary leaves the run folder, never a scan's own path or id."""
    spacings = []
    for entry in run.manifest().get("images", []):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(entry.get("image", "")))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        spacings.append(reader.GetSpacing())
    if not spacings:
        return None
    return [round(statistics.median(axis), 6) for axis in zip(*spacings)]


def bundle_metadata(run: RunFolder, cfg: config_mod.Config, iteration: int, latent_shape, units: str) -> dict:
    """``metadata.json`` of a bundle exported from ``run``: formats, versions, what a scan must look like, training
    summary (counts and dates only)."""
    history = run.history()
    trained = datetime.datetime.fromtimestamp(run.transformer_path(iteration).stat().st_mtime, datetime.timezone.utc)
    data = cfg.data
    return {
        "format": BUNDLE_FORMAT,
        "bundle_version": BUNDLE_VERSION,
        "run_format_version": FORMAT_VERSION,
        "packages": _package_versions(),
        "modality": MODALITY.get(data.intensity),
        "units": units,
        "intensity_normalisation": {
            "intensity": data.intensity, "clip_value": data.clip_value,
            "clip_percentile": data.clip_percentile if data.clip_value is None else None,
            "range": [0.0, data.intensity_range]},
        "spacing_mm": data.target_spacing or _training_spacing(run),
        "resampled_to_spacing": data.target_spacing is not None,
        "spatial_dims": data.spatial_dims,
        "model_grid": list(data.spatial_size or []),
        "latent_grid": list(latent_shape),
        "iteration": iteration,
        "detection": {k: getattr(cfg.detection, k) for k in
                      ("resampling_threshold", "samples", "dropout_passes", "density_threshold")},
        "training": {
            "scans": len(run.manifest().get("images", [])),
            "iterations": len(history.get("iterations", [])),
            "finished": bool(history.get("finished")),
            "preset": cfg.preset,
            "date": trained.date().isoformat(),
        },
        "exported": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }


def export_bundle(run_path: str | Path, out: str | Path, iteration: int | None = None,
                  units: str = "as the training scans") -> dict:
    """Write the model bundle of ``run_path``'s iteration ``iteration`` (default: the last trained) to ``out``.

    The zip appears under its final name only once complete. Returns its metadata.

    Args:
        units: the intensity units the model expects (e.g. "SUV"), recorded in ``metadata.json``.
    """
    from .transformer import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, TokenTransformer
    from .vqvae import FORMAT as VQVAE_FORMAT, FORMAT_VERSION as VQVAE_VERSION, load_vqvae

    run = RunFolder(Path(run_path))
    iteration = run.check_for_detection(iteration)
    if not run.manifest_path.is_file():
        raise InputError(run.root, "run folder is missing manifest.json (was training finished?)")
    cfg = run.config()
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InputError(out, "a model bundle's name must end in .zip")
    if out.is_dir():
        raise InputError(out, "is a folder; give the bundle's file name (MODEL.zip)")
    _, vqvae = load_vqvae(run.vqvae_path)  # checks the checkpoint's keys and that its weights fit its config
    # Weights, config and shapes only: losses and any other training extras stay in the run folder.
    vqvae_member = checkpoint_bytes(VQVAE_FORMAT, VQVAE_VERSION, {
        key: vqvae[key] for key in ("config", "spatial_dims", "state_dict", "latent_shape")})
    transformer = TokenTransformer.load(run.transformer_path(iteration))
    transformer_member = checkpoint_bytes(CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                          transformer.checkpoint_payload({"iteration": iteration}))
    metadata = bundle_metadata(run, cfg, iteration, vqvae["latent_shape"], units)
    config_text = run.config_path.read_text(encoding="utf-8")
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            bundle.writestr(BUNDLE_METADATA, json.dumps(metadata, indent=2) + "\n")
            bundle.writestr(CONFIG, config_text)
            bundle.writestr(VQVAE, vqvae_member)
            bundle.writestr(TRANSFORMER, transformer_member)
    return metadata


class ModelBundle:
    """A model bundle read for detection; the same methods :class:`~iltm.run.RunFolder` offers detection.

    Opening it checks the zip's members, their checksums and ``metadata.json``; problems are InputErrors naming it.

    Args:
        path: the ``.zip`` file.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.metadata = read_bundle_metadata(self.root, verify=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _member(self, name: str) -> bytes:
        try:
            with zipfile.ZipFile(self.root) as bundle:
                return bundle.read(name)
        except (zipfile.BadZipFile, OSError, KeyError, EOFError) as exc:
            raise InputError(self.root, f"cannot read {name} ({exc.__class__.__name__}: the bundle is damaged)") from None

    @property
    def iteration(self) -> int:
        return int(self.metadata.get("iteration", 0))

    def check_for_detection(self, iteration: int | None = None) -> int:
        if iteration is not None and iteration != self.iteration:
            raise InputError(self.root, f"the bundle holds iteration {self.iteration} only (asked for {iteration}; "
                                        f"export that iteration with 'iltm export RUN --iteration {iteration}')")
        return self.iteration

    def config(self) -> config_mod.Config:
        return config_mod.loads(self._member(CONFIG).decode("utf-8", errors="replace"),
                                where=f"{self.root}/{CONFIG}")

    def load_vqvae(self, map_location="cpu"):
        from .vqvae import load_vqvae

        return load_vqvae(self.root / VQVAE, map_location=map_location, data=self._member(VQVAE))

    def load_transformer(self, iteration: int, map_location="cpu"):
        from .transformer import TokenTransformer

        self.check_for_detection(iteration)
        return TokenTransformer.load(self.root / TRANSFORMER, map_location=map_location,
                                     data=self._member(TRANSFORMER))


def open_model(path: str | Path):
    """A run folder or a model bundle, whichever ``path`` is (:class:`RunFolder` or :class:`ModelBundle`)."""
    if isinstance(path, (RunFolder, ModelBundle)):
        return path
    path = Path(path)
    return ModelBundle(path) if is_bundle(path) else RunFolder(path)
