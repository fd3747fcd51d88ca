"""Run configuration: one dataclass per stage, presets, and one validation of the whole tree.

A run folder holds the full config it was trained with (``config.yaml``); detection reads it back so that
preprocessing and model shapes always match the trained weights. Every setting is declared with :func:`setting`,
which records what it allows; :func:`validate` checks a whole tree (a preset, a file, ``--set`` overrides) once,
before any data is read, and names the setting, the value and what is allowed. How each default was chosen is in
``docs/research.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import InputError
from .layout import DEFAULT_DENSITY_THRESHOLD, FORMAT_VERSION

DIMENSION_KEYS = ("2d", "3d")  # the keys of a setting given one per dimension, such as {"2d": a, "3d": b}


def setting(default: Any = None, *, low: Optional[float] = None, high: Optional[float] = None, above: bool = False,
            choices: Optional[tuple] = None, factory: Any = None):
    """A config field and what it allows: numbers in [low, high] (``above``: strictly above ``low``), text among
    ``choices``. The type comes from the field's annotation."""
    metadata = {"low": low, "high": high, "above": above, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def per_dimension(value: Any, dims: Optional[int], missing: Any = None) -> Any:
    """What a setting that may be one per dimension (``{"2d": a, "3d": b}``) is for ``dims``-D scans; ``missing``
    when it is per dimension without a value for them."""
    return value.get(f"{dims}d", missing) if isinstance(value, dict) else value


@dataclass
class DataConfig:
    """How a scan becomes the network's input array.

    Attributes:
        spatial_dims: 2 or 3; null until the training data has been read (it is inferred).
        target_spacing: resample to this spacing in mm (x-y(-z)); null keeps the native grid.
        intensity: "pet" (clip, then scale to [0, 1]), "unit8bit" (0..255 -> [0, 1]), "8bit" (keep 0..255), "none".
        clip_percentile: the percentile of each scan that "pet" clips at when ``clip_value`` is null.
        clip_value: absolute upper clip for "pet" (e.g. SUV 15); the same for every scan, so preferred for cohorts.
        units: "suv" = DICOM PET series are converted to body-weight SUV when read (other files are taken to be in
            SUV already), so ``clip_value`` is in SUV; "as_is" = voxel values as stored.
        spatial_size: crop/pad every scan to this size (voxels, x-y(-z)); null = the training scans' largest extent.
        augment: the paper's augmentation (random affine; elastic in 3D) while training.
        rotate_degrees: largest random rotation of the augmentation.
        scale_range: largest relative random scaling of the augmentation.
        translate_voxels: largest random shift of the augmentation.
        elastic_3d: add MONAI's random 3D elastic deformation in 3D.
        augment_prob: probability of each random transform.
    """

    spatial_dims: Optional[int] = setting(None, choices=(2, 3))
    target_spacing: Optional[List[float]] = setting(None, low=0, above=True)
    intensity: str = setting("pet", choices=("pet", "unit8bit", "8bit", "none"))
    clip_percentile: float = setting(99.9, low=0, high=100, above=True)
    clip_value: Optional[float] = setting(None, low=0, above=True)
    units: str = setting("as_is", choices=("as_is", "suv"))
    spatial_size: Optional[List[int]] = setting(None, low=1)
    augment: bool = setting(True)
    rotate_degrees: float = setting(5.0, low=0, high=180)
    scale_range: float = setting(0.05, low=0, high=1)
    translate_voxels: float = setting(2.0, low=0)
    elastic_3d: bool = setting(True)
    augment_prob: float = setting(0.5, low=0, high=1)

    @property
    def intensity_range(self) -> float:
        """Width of the normalised intensity range: 255 for ``"8bit"``, else 1."""
        return 255.0 if self.intensity == "8bit" else 1.0

    def check(self) -> None:
        for key in ("target_spacing", "spatial_size"):
            value = getattr(self, key)
            if value is not None and self.spatial_dims is not None and len(value) != self.spatial_dims:
                raise ValueError(f"data.{key}={value!r}: needs {self.spatial_dims} values for "
                                 f"spatial_dims={self.spatial_dims}")


@dataclass
class VQVAEConfig:
    """MONAI ``VQVAE`` shape and its training schedule.

    Attributes:
        channels: channels of each level; ``len(channels)`` is the number of downsamplings (each x2).
        num_res_layers: residual layers per level.
        num_res_channels: channels of the residual layers.
        num_embeddings: codebook size (the Transformer's vocabulary).
        embedding_dim: length of a codebook vector.
        commitment_cost: weight of the commitment loss.
        decay: EMA decay of the codebook.
        dropout: dropout of the decoder (active at detection: the D decodes of a healed latent differ by it).
        epochs: training epochs (fewer where ``max_steps`` applies).
        batch_size: scans per optimiser step (per dimension; see ``min_steps``).
        learning_rate: AdamW's initial rate (cosine decay to 10 %).
        max_steps: stop after as many whole epochs as make this many optimiser steps, so that a larger cohort
            costs no more; 0 = off (per dimension).
        min_steps: shrink the batches (down to 1 scan) until the epochs make this many steps; 0 = off (per dimension).
        collapse_retries: retrain a VQ-VAE using under 1/4 of its codes from other seeds, up to this often (per dim.).
    """

    channels: List[int] = setting(factory=lambda: [256, 256, 256], low=1)
    num_res_layers: int = setting(2, low=1)
    num_res_channels: int = setting(256, low=1)
    num_embeddings: int = setting(256, low=1)
    embedding_dim: int = setting(128, low=1)
    commitment_cost: float = setting(0.25, low=0)
    decay: float = setting(0.5, low=0, high=1)
    dropout: float = setting(0.05, low=0, high=1)
    epochs: int = setting(500, low=1)
    batch_size: Union[int, Dict[str, int]] = setting(8, low=1)
    learning_rate: float = setting(1e-4, low=0, above=True)
    max_steps: Union[int, Dict[str, int]] = setting(0, low=0)
    min_steps: Union[int, Dict[str, int]] = setting(0, low=0)
    collapse_retries: Union[int, Dict[str, int]] = setting(0, low=0)

    def retries_for(self, dims: Optional[int]) -> int:
        """The ``collapse_retries`` that apply to ``dims``-D scans (they may be one per dimension)."""
        return per_dimension(self.collapse_retries, dims, missing=0)

    def batch_for(self, dims: Optional[int]) -> int:
        """The ``batch_size`` that applies to ``dims``-D scans (8 where it is per dimension without them)."""
        return per_dimension(self.batch_size, dims, missing=8)

    def max_steps_for(self, dims: Optional[int]) -> int:
        """The ``max_steps`` that apply to ``dims``-D scans (0: no cap)."""
        return per_dimension(self.max_steps, dims, missing=0)

    def min_steps_for(self, dims: Optional[int]) -> int:
        """The ``min_steps`` that applies to ``dims``-D scans (it may be one per dimension)."""
        return per_dimension(self.min_steps, dims, missing=0)

    def check(self) -> None:
        if not self.channels:
            raise ValueError("vqvae.channels=[]: needs at least one level")

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)


@dataclass
class TransformerConfig:
    """Decoder-only Transformer over the token raster (nanoGPT-like).

    Attributes:
        n_layer: blocks.
        n_head: attention heads (must divide ``n_embd``).
        n_embd: width of the residual stream.
        dropout: dropout in training.
        epochs: training epochs per ILTM iteration.
        shorter_epochs: also fit iteration 0's fold Transformers for this many epochs (their own cosine schedule),
            and train the whole run with the schedule whose held-out NLL of the training tokens is lower (needs
            cross-fitting; may be one per dimension; 0 or not below ``epochs`` = off). On 48 photographs or brain
            slices 80 epochs overfit (docs/research.md, "The Transformer's epochs, chosen per cohort").
        batch_size: token rasters per optimiser step.
        learning_rate: AdamW's initial rate (cosine decay to 10 %).
        weight_decay: AdamW's weight decay.
    """

    n_layer: int = setting(16, low=1)
    n_head: int = setting(8, low=1)
    n_embd: int = setting(256, low=1)
    dropout: float = setting(0.0, low=0, high=1)
    epochs: int = setting(300, low=1)
    batch_size: int = setting(8, low=1)
    learning_rate: float = setting(5e-4, low=0, above=True)
    weight_decay: float = setting(0.01, low=0)
    shorter_epochs: Union[int, Dict[str, int]] = setting(0, low=0)

    def shorter_for(self, dims: Optional[int]) -> int:
        """The ``shorter_epochs`` that apply to ``dims``-D scans; 0 (no choice, always ``epochs``) where they are not
        below ``epochs``, as when ``--set transformer.epochs=N`` asks for a short run."""
        value = per_dimension(self.shorter_epochs, dims, missing=0)
        return value if value < self.epochs else 0

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"transformer.n_head={self.n_head}: must divide transformer.n_embd={self.n_embd}")


@dataclass
class DetectionConfig:
    """KDE detection of one image (DESIGN.md, step 3).

    Attributes:
        resampling_threshold: t: tokens with p(s_i | s_<i) below it are resampled.
        resampling_quantile: q: training sets t to the q-quantile of its scans' token probabilities; null = absolute t
            (per dimension).
        samples: S, healed token sequences.
        dropout_passes: D, decoder passes with dropout per healed sequence; N = S x D reconstructions.
        eps: KDE bandwidth regulariser in normalised intensity units; null = 5 % of the intensity range.
        density_threshold: tau: voxels whose KDE density is below it are anomalous in the binary map.
        kde_chunk_voxels: voxels scored per KDE chunk; bounds memory at about N x chunk x 8 bytes.
        decode_batch: reconstructions decoded per decoder call.
        stream_above_mb: detection's memory budget in MB. The N reconstructions (N x voxels x 4 bytes) are held at
            once while they and one decoder call fit in it; beyond, they are decoded twice in batches (the same
            dropout draws) and the KDE is accumulated from them (moments, then kernel sums); 0 = always stream.
            Decoder batches shrink to fit it, and healing runs as many of the S sequences at once as their KV caches
            fit in it (at least one of each).
        tile_overlap: share of a window that overlaps the next one when a scan larger than the model grid is scored
            in windows; the windows' log densities are blended with Gaussian weights that fall off towards their
            edges (MONAI's sliding-window importance map).
        cuda_graphs: on CUDA, replay healing's model calls from CUDA graphs captured once per process (the calls
            are launch-bound); false runs them eagerly. The draws are the same in float32 (tested on a CPU).
    """

    resampling_threshold: float = setting(0.005, low=0, high=1, above=True)
    resampling_quantile: Union[Optional[float], Dict[str, Optional[float]]] = setting(None, low=0, high=1, above=True)
    samples: int = setting(60, low=1)
    dropout_passes: int = setting(5, low=1)
    eps: Optional[float] = setting(None, low=0, above=True)
    density_threshold: float = setting(DEFAULT_DENSITY_THRESHOLD, low=0, above=True)
    kde_chunk_voxels: int = setting(65536, low=1)
    decode_batch: int = setting(32, low=1)
    stream_above_mb: float = setting(1024.0, low=0)
    tile_overlap: float = setting(0.25, low=0, high=0.9)
    cuda_graphs: bool = setting(True)

    def quantile_for(self, dims: Optional[int]) -> Optional[float]:
        """The ``resampling_quantile`` that applies to ``dims``-D scans (None: the absolute t)."""
        return per_dimension(self.resampling_quantile, dims)

    def check(self) -> None:
        if self.samples * self.dropout_passes < 2:
            raise ValueError(f"detection.samples={self.samples} x detection.dropout_passes={self.dropout_passes}: "
                             "the KDE needs at least 2 reconstructions")


@dataclass
class ILTMConfig:
    """The outer loop (DESIGN.md, step 4).

    Attributes:
        max_iterations: ILTM iterations after the unmasked iteration 0 (per dimension; 5 where it names none).
        threshold_decay: the resampling threshold falls by this share each iteration (0.125: the paper's).
        constant_threshold: keep the resampling threshold constant instead.
        stop_change: stop when the masked-token count changes by less than this share.
        cross_fit_folds: 0 = self-scored masks (the paper); K >= 2 = fold j's scans masked by a model fitted without it.
        mask_density_threshold: tau of the training-scan masks; null = ``detection.density_threshold``.
        spare_shared_uptake: leave a token unmasked where this share of the other scans is as bright (PET; per dim.).
        select_iteration: the iteration detection uses by default: "last", or "best" (history.json's best_iteration:
            the last unless it predicts the training tokens no iteration flagged worse than iteration 0, then
            iteration 0); per dimension.
        full_transformers: with cross-fitting, whose full-cohort Transformer training fits: "every" iteration's, or
            only the one detection uses ("used": the training-scan masks, the adaptive threshold and the iteration
            selection all come from the fold Transformers, so the others' full fits would be read by nobody;
            ``iltm train --resume RUN --full-fit K`` fits iteration K's later). Without cross-fitting every
            iteration needs its own.
    """

    max_iterations: Union[int, Dict[str, int]] = setting(5, low=0)
    threshold_decay: float = setting(0.125, low=0, high=1)
    constant_threshold: bool = setting(False)
    stop_change: float = setting(0.01, low=0)
    cross_fit_folds: int = setting(0, low=0)
    mask_density_threshold: Optional[float] = setting(None, low=0, above=True)
    spare_shared_uptake: Union[Optional[float], Dict[str, Optional[float]]] = setting(None, low=0, high=1)
    select_iteration: Union[str, Dict[str, str]] = setting("last", choices=("last", "best"))
    full_transformers: str = setting("every", choices=("every", "used"))

    def fits_every_transformer(self) -> bool:
        """Whether training fits every iteration's full-cohort Transformer (always without cross-fitting)."""
        return not self.cross_fit_folds or self.full_transformers == "every"

    def iterations_for(self, dims: Optional[int]) -> int:
        """The ``max_iterations`` that apply to ``dims``-D scans (they may be one per dimension)."""
        return per_dimension(self.max_iterations, dims, missing=5)

    def spare_share(self, dims: Optional[int]) -> Optional[float]:
        """The share q that applies to ``dims``-D scans (``spare_shared_uptake`` may be one per dimension)."""
        return per_dimension(self.spare_shared_uptake, dims)

    def selection_for(self, dims: Optional[int]) -> str:
        """The ``select_iteration`` that applies to ``dims``-D scans ("last" where it names none)."""
        return per_dimension(self.select_iteration, dims, missing="last")

    def check(self) -> None:
        if self.cross_fit_folds == 1:
            raise ValueError("iltm.cross_fit_folds=1: must be 0 (off) or at least 2")

    def check_cohort(self, n_scans: int, where: str = "config") -> None:
        """InputError for settings that a cohort of ``n_scans`` training scans cannot run with."""
        k = self.cross_fit_folds
        if k > n_scans:
            raise InputError(where, f"iltm.cross_fit_folds={k} needs at least {k} training scans, "
                                    f"there are {n_scans}")
        shares = self.spare_shared_uptake.values() if isinstance(self.spare_shared_uptake, dict) else [
            self.spare_shared_uptake]
        if any(v is not None for v in shares) and n_scans < 2:
            raise InputError(where, "iltm.spare_shared_uptake compares training scans with each other: "
                                    f"it needs at least 2, there are {n_scans}")


@dataclass
class Config:
    """The whole tree: one section per stage, plus the run's seed, device and precision.

    A setting "per dimension" takes one value or a mapping such as ``{2d: 0, 3d: 2400}`` (a missing key = off); the
    run's ``config.yaml`` records the value that applied.

    Attributes:
        precision: "auto" = bfloat16 autocast on CUDA (training steps, detection's decoding and Transformer passes),
            float32 on a CPU; "bfloat16" = autocast on any device; "float32" = never (see iltm.precision).
    """

    preset: str = setting("paper")
    seed: int = setting(0)
    device: str = setting("auto")
    precision: str = setting("auto", choices=("auto", "float32", "bfloat16"))
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    iltm: ILTMConfig = field(default_factory=ILTMConfig)
    version: int = setting(FORMAT_VERSION, choices=(FORMAT_VERSION,))

    def eps(self) -> float:
        """The KDE regulariser: explicit, or 5 % of the normalised intensity range."""
        if self.detection.eps is not None:
            return float(self.detection.eps)
        return 0.05 * self.data.intensity_range

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


# Small models on small cohorts: cross-fitted masks with a looser tau, and sparing shared uptake in 3D
# (docs/research.md, "How the defaults were chosen"); the full-cohort Transformer only where detection uses it
# (docs/research.md, "Where a CPU run's time goes").
TRAINING_MASKS = dict(cross_fit_folds=2, mask_density_threshold=0.05, spare_shared_uptake={"3d": 0.25},
                      full_transformers="used")

# Overrides of the paper defaults. "paper" is the dataclass defaults themselves (DESIGN.md numbers).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "small": {
        "vqvae": dict(channels=[64, 128], num_res_layers=1, num_res_channels=64, num_embeddings=128,
                      embedding_dim=32, epochs=120, batch_size=8, learning_rate=5e-4),
        "transformer": dict(n_layer=6, n_head=4, n_embd=128, epochs=100, batch_size=16, learning_rate=1e-3),
        "detection": dict(samples=40, dropout_passes=4, resampling_threshold=0.01),
        "iltm": dict(max_iterations=4, **TRAINING_MASKS),
    },
    "tiny": {
        # In 3D, 2400 optimiser steps of at most two volumes whatever the cohort's size: enough steps keep the
        # codebook from collapsing, no more keep the cost from growing with the cohort (docs/research.md, "Enough
        # optimiser steps for the 3D VQ-VAE" and "Where a CPU run's time goes").
        "vqvae": dict(channels=[32, 64], num_res_layers=1, num_res_channels=32, num_embeddings=128,
                      embedding_dim=32, epochs=200, batch_size={"2d": 8, "3d": 2}, learning_rate=5e-4,
                      min_steps={"3d": 2400}, max_steps={"3d": 2400}, collapse_retries={"3d": 1}),
        # In 2D, 40 epochs where they predict the training scans' held-out tokens better than 80: on photographs and
        # brain slices 80 overfit, on the phantom 40 underfit (docs/research.md, "The Transformer's epochs, chosen
        # per cohort"). 3D keeps 80 (40 lost 10-17 best-Dice points there).
        "transformer": dict(n_layer=3, n_head=4, n_embd=64, epochs=80, batch_size=16, learning_rate=2e-3,
                            shorter_epochs={"2d": 40}),
        # In 2D t is the 0.3-quantile of the cohort's own held-out token probabilities (0.09-0.11 on the phantom,
        # where t = 0.1 was chosen; 0.006 on textures and anatomy, where t = 0.1 resampled 63-65 % of the tokens).
        "detection": dict(samples=20, dropout_passes=3, resampling_threshold=0.1, resampling_quantile={"2d": 0.3}),
        # In 3D one masked iteration: on the 3D sweeps its held-out scores equal the third's within the seeds'
        # spread, at half the iterations' cost (docs/research.md, "Where a CPU run's time goes"). Detection keeps
        # iteration 0 where the last iteration predicts the never-flagged training tokens worse (docs/research.md,
        # "ILTM never ends below its iteration 0").
        "iltm": dict(max_iterations={"2d": 3, "3d": 1}, select_iteration="best", **TRAINING_MASKS),
    },
}

# Settings of earlier versions that were removed because they did not help (docs/research.md). A config that gives
# one its neutral value still loads; any other value is refused with the reason.
RETIRED = {
    "vqvae": {"restart_dead_codes": False, "act": "relu", "init_candidates": 1, "init_epochs": None,
              "codebook_init": "normal", "warmup_epochs": 0},
    "detection": {"resampling_dilation": 0},
    "iltm": {"mask_dilation": 0, "same_transformer_seed": False},
}


# -- validation ------------------------------------------------------------------------------------------------

def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        parts = [_describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.insert(0, "null")
        return " or ".join(parts)
    if origin in (list, List):
        return f"a list of {_describe(args[0]).replace('a ', '', 1)}s"
    if origin in (dict, Dict):
        return f"one per dimension such as {{2d: ..., 3d: ...}} of {_describe(args[1])}"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(hint, str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, List):
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return (isinstance(value, dict) and set(value) <= set(DIMENSION_KEYS)
                and all(_conforms(v, args[1]) for v in value.values()))
    return True


def _numbers(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _range_text(meta: dict) -> str:
    low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
    if low is not None and high is not None:
        return f" in {'(' if above else '['}{low:g}, {high:g}]"
    if low is not None:
        return f" {'above' if above else 'of at least'} {low:g}"
    return ""


def _check_value(name: str, value: Any, hint: Any, meta: dict) -> None:
    allowed = _describe(hint) + _range_text(meta)
    if meta.get("choices") is not None:
        allowed = "one of " + ", ".join(map(str, meta["choices"]))
    ok = _conforms(value, hint)
    if ok and meta.get("choices") is not None:
        values = value.values() if isinstance(value, dict) else [value]
        ok = all(v in meta["choices"] or v is None for v in values)
    if ok:
        low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
        for n in _numbers(value):
            if (low is not None and (n < low or (above and n == low))) or (high is not None and n > high):
                ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed (allowed: {allowed})")


def validate(cfg: Any, where: str = "config", prefix: str = "") -> Any:
    """Check every setting of a config tree for type and range, then each section's own rules; InputError at
    ``where`` naming the first bad setting, its value and what is allowed. Returns ``cfg``."""
    hints = get_type_hints(type(cfg))
    try:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                validate(value, where, f"{prefix}{f.name}.")
            else:
                _check_value(prefix + f.name, value, hints[f.name], dict(f.metadata))
        if hasattr(cfg, "check"):
            cfg.check()
    except ValueError as exc:
        raise InputError(where, str(exc)) from None
    return cfg


# -- building a tree -------------------------------------------------------------------------------------------

def _apply(obj: Any, values: dict[str, Any], where: str, path: str) -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    retired = RETIRED.get(path.rstrip("."), {})
    for key, value in values.items():
        name = f"{path}{key}"
        if key in retired and key not in known:
            if retired[key] is not None and value != retired[key]:
                raise InputError(where, f"{name}={value!r}: this setting was removed (it did not help; see "
                                        f"docs/research.md); this iltm reads run format version {FORMAT_VERSION} "
                                        f"without it")
            continue
        if key not in known:
            raise InputError(where, f"unknown setting '{name}' (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise InputError(where, f"section '{name}' must be a mapping")
            _apply(current, value, where, f"{name}.")
        else:
            setattr(obj, key, copy.deepcopy(value))


def from_dict(values: dict[str, Any], where: str = "config", root: type = Config) -> Any:
    """A validated tree of type ``root`` from a (possibly partial) nested dict; unknown keys are refused."""
    cfg = root()
    _apply(cfg, values, where, "")
    return validate(cfg, where)


def preset(name: str, root: type = Config, presets: Optional[dict] = None) -> Any:
    """The preset ``name`` as a validated tree (``presets`` defaults to :data:`PRESETS`)."""
    presets = PRESETS if presets is None else presets
    if name not in presets:
        raise InputError("--preset", f"unknown preset '{name}' (choose from {', '.join(presets)})")
    cfg = from_dict(presets[name], where=f"preset {name}", root=root)
    cfg.preset = name
    return cfg


def load(path: Union[str, Path], root: type = Config) -> Any:
    """Read a config file (a run's ``config.yaml``); a missing file, bad YAML, another format version or a bad
    setting is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not valid YAML ({exc.__class__.__name__})") from None
    return loads(text, where=str(path), root=root)


def loads(text: str, where: str = "config", root: type = Config) -> Any:
    """:func:`load` of a config's text (a bundle member), ``where`` naming it in errors."""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(where, f"not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise InputError(where, "config must be a mapping")
    version = values.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InputError(where, f"written by an incompatible version (config version {version}, "
                               f"this iltm reads {FORMAT_VERSION})")
    return from_dict(values, where=where, root=root)


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML, so numbers and lists work; ``1e-3`` (YAML 1.1 text) is the number a user means."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InputError("--set", f"'{text}' is not a valid value (YAML: a number, true/false, null, text or "
                                  f"a list such as [64, 64])") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def set_dotted(cfg: Any, dotted: str, value: Any) -> None:
    """Apply one ``section.key=value`` override (a string value is parsed by :func:`parse_value`); the tree is
    validated by whoever finishes building it (:func:`build`)."""
    if isinstance(value, str):
        value = parse_value(value)
    parts = dotted.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise InputError("--set", f"unknown section '{part}' in '{dotted}'")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)} or \
            dataclasses.is_dataclass(getattr(obj, parts[-1])):
        raise InputError("--set", f"unknown setting '{dotted}'")
    setattr(obj, parts[-1], value)


def build(preset_name: str = "paper", config_file: Optional[Union[str, Path]] = None, overrides: List[str] = (),
          root: type = Config, presets: Optional[dict] = None, **top: Any) -> Any:
    """The tree a command runs with: a preset (or a config file), then the top-level values ``top`` (seed, device;
    None = keep) and section overrides (``iltm.max_iterations``-style keys in ``top`` too, written with ``__``),
    then ``--set SECTION.KEY=VALUE`` overrides; validated once it is complete.

    Args:
        overrides: ``SECTION.KEY=VALUE`` strings.
        top: e.g. ``seed=1``, ``device="cpu"``, ``iltm__max_iterations=2``; None values are skipped.
    """
    cfg = load(config_file, root) if config_file else preset(preset_name, root, presets)
    for key, value in top.items():
        if value is not None:
            set_dotted(cfg, key.replace("__", "."), value)
    for item in overrides or []:
        if "=" not in item:
            raise InputError("--set", f"'{item}' is not SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        set_dotted(cfg, key.strip(), value)
    return validate(cfg, "--set" if overrides else "config")
