"""Run configuration: one dataclass per stage, presets, YAML round trip.

A run folder holds the full config it was trained with (``config.yaml``); detection reads it back so that
preprocessing and model shapes always match the trained weights.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

CONFIG_VERSION = 1


@dataclass
class DataConfig:
    """How a scan becomes the network's input array.

    Args:
        spatial_dims: 2 or 3; ``None`` until the training data has been read (it is inferred).
        target_spacing: resample to this spacing in mm (per axis, x-y(-z) order); ``None`` keeps the native grid.
        intensity: ``"pet"`` (clip at ``clip_percentile`` of the scan, or at ``clip_value`` when set, then scale to
            [0, 1]), ``"unit8bit"`` (0..255 -> [0, 1]), ``"8bit"`` (keep 0..255), or ``"none"``.
        clip_percentile: percentile used by ``"pet"`` when ``clip_value`` is ``None``.
        clip_value: absolute upper clip (e.g. SUV 15) for ``"pet"``; consistent across scans, so preferred for cohorts.
        spatial_size: crop/pad every scan to this size (voxels, x-y(-z)); ``None`` pads up to the next multiple of
            the VQ-VAE's total downsampling factor.
        augment: paper augmentation (random affine; elastic in 3D) while training the VQ-VAE and Transformer.
    """

    spatial_dims: int | None = None
    target_spacing: list[float] | None = None
    intensity: str = "pet"
    clip_percentile: float = 99.9
    clip_value: float | None = None
    spatial_size: list[int] | None = None
    augment: bool = True
    rotate_degrees: float = 5.0
    scale_range: float = 0.05
    translate_voxels: float = 2.0
    elastic_3d: bool = True
    augment_prob: float = 0.5

    @property
    def intensity_range(self) -> float:
        """Width of the normalised intensity range: 255 for ``"8bit"``, else 1."""
        return 255.0 if self.intensity == "8bit" else 1.0


CODEBOOK_INITS = ("normal", "encoder")
DIMENSION_KEYS = {"2d", "3d"}  # the keys of a setting given one per dimension, such as {"2d": a, "3d": b}


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _whole_per_dimension(value: Any) -> bool:
    """A whole number of at least 0, or one per dimension (``{"2d": a, "3d": b}``)."""
    return _whole(value, 0) or (isinstance(value, dict) and set(value) <= DIMENSION_KEYS
                                and all(_whole(v, 0) for v in value.values()))


def per_dimension(value: Any, dims: int | None, missing: Any = None) -> Any:
    """What a setting that may be one per dimension (``{"2d": a, "3d": b}``) is for ``dims``-D scans; ``missing``
    when it is per dimension without a value for them."""
    return value.get(f"{dims}d", missing) if isinstance(value, dict) else value


@dataclass
class VQVAEConfig:
    """MONAI ``VQVAE`` shape and its training schedule. ``len(channels)`` is the number of downsamplings (each x2).

    Attributes:
        restart_dead_codes: re-seed codebook vectors that the batches stopped using with encoder outputs of the
            current batch, during the first half of the epochs (``iltm.vqvae.DeadCodeRestarter``). Off by default:
            on a 3D tiny cohort it revived collapsed codebooks (9 -> 119 codes used) but did not raise best Dice
            on average over three seeds (README, "Results", 3D), and the committed results were made without it.
        act: the activation of the encoder and decoder blocks, a MONAI ``Act`` name (``"relu"``, MONAI's and
            the paper's, or ``"leakyrelu"``, ``"prelu"``, ...). In the 3D ``tiny`` runs whose codebook partly
            collapsed most ReLU channels of the second encoder block never switched on; ``"leakyrelu"`` did not
            prevent the collapse there (Testing/Benchmarks/results/README.md, "VQ-VAE"), so the default stays.
        init_candidates: 1 = train the VQ-VAE from the run's initialisation (the paper). N > 1 = first train N
            initialisations (the run's and N - 1 others) for ``init_epochs`` epochs each, then train the one with
            the lowest last-epoch loss for the full schedule, exactly as a run with that initialisation would. On
            small 3D cohorts the VQ-VAE's quality depends on luck; the early loss ranked four initialisations on
            one cohort, but in a sweep the chosen one still collapsed on two of four cohorts, because runs escape
            their early plateau (or not) only after 30-100 epochs (Testing/Benchmarks/results/README.md).
        init_epochs: epochs of each trial when ``init_candidates`` > 1.
        codebook_init: ``"normal"`` = MONAI's codebook, drawn from N(0, 1) (the paper's); ``"encoder"`` = k-means
            centroids of the fresh encoder's outputs on the training scans (``iltm.vqvae.init_codebook_from_encoder``).
            With MONAI's draw every latent takes one code at the start (the codebook's norms are about 50 times
            the encoder outputs'). Starting with every code in use did not stop the 3D ``tiny`` codebook collapsing
            in training (one run seed: 9 codes either way), so the default stays.
        warmup_epochs: W > 0 = the learning rate rises linearly over the first W epochs (``iltm.train.fit``).
        min_steps: S > 0 = on a cohort too small for ``epochs`` epochs of ``batch_size`` scans to make S optimiser
            steps, the batch is made smaller (down to 1 scan) until they do (``iltm.train.stage_batch_size``); a
            run's ``history.json`` records the batch size used. 0 = always ``batch_size`` (the paper's). May differ
            per dimension, ``{"2d": s2, "3d": s3}`` (a missing key = 0); a run's ``config.yaml`` records the value
            that applied. The paper trains on thousands of scans; on 24 3D ``tiny`` volumes a batch of 8 makes 600
            steps, and the codebook of some run seeds collapsed on a plateau that 2400 steps (a batch of 2, the
            same compute) left behind; in 2D the ``tiny`` VQ-VAE never collapsed and 2400 steps did not help
            (Testing/Benchmarks/results/README.md, "3D: the VQ-VAE").
        collapse_retries: R > 0 = when the trained VQ-VAE uses fewer than a quarter of its codes on the training
            scans (a partly collapsed codebook, ``iltm.train.PARTIAL_COLLAPSE_SHARE``), train it again from
            another initialisation, up to R times, and keep the one that uses the most codes; the ones set aside
            stay in the run folder (``vqvae_attempt<n>.pt``) and in ``history.json`` (``vqvae_attempts``). Each
            retry costs one more VQ-VAE training, and only when the codebook collapsed. May differ per dimension,
            ``{"2d": r2, "3d": r3}`` (a missing key = 0); a run's ``config.yaml`` records the value that applied.
            On the one 3D tiny cohort of ten whose codebook still collapsed at 2400 steps (seed 1, 100 %
            anomalous: 12 codes), one retry used 123 codes (Testing/Benchmarks/results/README.md).
    """

    channels: list[int] = field(default_factory=lambda: [256, 256, 256])
    num_res_layers: int = 2
    num_res_channels: int = 256
    num_embeddings: int = 256
    embedding_dim: int = 128
    commitment_cost: float = 0.25
    decay: float = 0.5
    dropout: float = 0.05
    epochs: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-4
    restart_dead_codes: bool = False
    act: str = "relu"
    init_candidates: int = 1
    init_epochs: int = 25
    codebook_init: str = "normal"
    warmup_epochs: int = 0
    min_steps: int | dict[str, int] = 0
    collapse_retries: int | dict[str, int] = 0

    def retries_for(self, dims: int | None) -> int:
        """The ``collapse_retries`` that apply to ``dims``-D scans (they may be one per dimension)."""
        return per_dimension(self.collapse_retries, dims, missing=0)

    def steps_for(self, dims: int | None) -> int:
        """The ``min_steps`` that applies to ``dims``-D scans (it may be one per dimension)."""
        return per_dimension(self.min_steps, dims, missing=0)

    def check(self) -> None:
        """InputError naming the setting for an activation MONAI does not know, a trial count below 1, a step count
        that is not a whole number of at least 0 (or one per dimension) or an unknown codebook initialisation."""
        from monai.networks.layers.factories import Act

        if not isinstance(self.act, str) or self.act.upper() not in Act.names:
            raise InputError("vqvae.act", f"unknown activation {self.act!r} (MONAI's Act names, e.g. relu, "
                                          f"leakyrelu, prelu)")

        for key, least in (("init_candidates", 1), ("init_epochs", 1), ("warmup_epochs", 0)):
            value = getattr(self, key)
            if not _whole(value, least):
                raise InputError(f"vqvae.{key}", f"must be a whole number of at least {least}, not {value!r}")
        for key, example in (("min_steps", "{2d: 0, 3d: 2400}"), ("collapse_retries", "{2d: 0, 3d: 1}")):
            if not _whole_per_dimension(getattr(self, key)):
                raise InputError(f"vqvae.{key}", f"must be a whole number of at least 0, or one per dimension such "
                                                 f"as {example}, not {getattr(self, key)!r}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise InputError("vqvae.codebook_init", f"must be one of {', '.join(CODEBOOK_INITS)}, not "
                                                    f"{self.codebook_init!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)


@dataclass
class TransformerConfig:
    """Decoder-only Transformer over the token raster (nanoGPT-like)."""

    n_layer: int = 16
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    epochs: int = 300
    batch_size: int = 8
    learning_rate: float = 5e-4
    weight_decay: float = 0.01


@dataclass
class DetectionConfig:
    """KDE detection of one image (DESIGN.md, step 3).

    Args:
        resampling_threshold: tokens with p(s_i | s_<i) below this are resampled (t).
        resampling_dilation: r > 0 = the tokens within r of a flagged token (a cube of side 2r + 1 on the latent
            grid) are resampled too; 0 = only the flagged tokens (the paper). A lesion changes its neighbours'
            codes as well (3D tiny, 100 % anomalous: 58 % of the tokens next to a lesion and 23 % of those two
            tokens away differ from the same subject's lesion-free codes, 6 % farther away), and a neighbour kept
            as it is can rebuild part of the lesion. On the two 3D validation cohorts (iteration 0, 100 %
            anomalous) r = 1 moved best Dice by +9.8 and -10.8 points at t = 0.005, and by -2.7 at the ``tiny``
            t = 0.1 (one cohort), so it is off (Testing/Benchmarks/results/README.md, "3D: how far a lesion
            reaches into the codes").
        samples: number of healed token sequences (S).
        dropout_passes: decoder passes with dropout per healed sequence (D); N = S x D reconstructions.
        eps: KDE bandwidth regulariser in normalised intensity units; ``None`` = 5 % of the intensity range.
        density_threshold: voxels with KDE density below this are anomalous in the binary map (tau).
        kde_chunk_voxels: voxels scored per KDE chunk, bounds memory at about N x chunk x 8 bytes.
        decode_batch: reconstructions decoded per decoder call.
    """

    resampling_threshold: float = 0.005
    resampling_dilation: int = 0
    samples: int = 60
    dropout_passes: int = 5
    eps: float | None = None
    density_threshold: float = 0.005
    kde_chunk_voxels: int = 65536
    decode_batch: int = 32

    def check(self) -> None:
        """InputError for settings detection cannot run with."""
        if not _whole(self.resampling_dilation, 0):
            raise InputError("detection.resampling_dilation", "must be a whole number of tokens of at least 0, not "
                                                              f"{self.resampling_dilation!r}")


@dataclass
class ILTMConfig:
    """The outer loop (DESIGN.md, step 4).

    Attributes:
        cross_fit_folds: 0 = each iteration's Transformer flags its own training scans (the paper). K >= 2 = the
            training scans are split into K folds (scan i in fold i mod K) and K more Transformers are fitted per
            iteration, each without one fold, which it then scores: a Transformer that has seen a lesion
            predicts it, so self-scoring misses most training lesions (README, "Results").
        mask_density_threshold: tau of the training-scan masks; ``None`` = ``detection.density_threshold``.
            Masking a normal token costs one training target, leaving a lesion unmasked teaches it as normal,
            so this may be looser than the tau of the output maps.
        spare_shared_uptake: ``None`` = off. A share q in [0, 1]: a flagged token is left unmasked when at least
            q of the other training scans have at least ``SHARED_UPTAKE_RATIO`` (80 %) of its uptake (brightest
            voxel of its footprint, on the model grid) at the same token position: bright where most scans are
            bright is anatomy (brain, bladder), not a lesion. Assumes scans roughly aligned on the model grid
            (whole-body PET cropped or padded alike) and bright anomalies, so it acts only when
            ``data.intensity`` is ``"pet"`` (a dark anomaly would always be spared). May differ per dimension:
            ``{"2d": q2, "3d": q3}`` (a missing key = off); a run's ``config.yaml`` records the value it used.
        mask_dilation: r > 0 = every masked token also masks the tokens within r of it on the latent grid (a cube of
            side 2r + 1: 26 neighbours in 3D, 8 in 2D, at r = 1); 0 = only the tokens whose footprint holds a
            flagged voxel (the paper). The encoder's receptive field and the scanner's blur reach past a lesion's
            footprint, so its neighbours' codes can be unusual too, and left unmasked they teach the Transformer
            that they are normal: on a 3D tiny cohort (seed 0, 100 % anomalous, 2400 VQ-VAE steps) masking the
            labels' tokens raised best Dice from 47.9 to 53.3, the labels dilated by one token to 63.4, near the
            65.0 of a Transformer fitted on the same subjects without lesions (Testing/Benchmarks/mask_ceiling.py);
            on two other cohorts dilating the labels added 2.8 and -0.6. ILTM's own masks are not the labels:
            dilated, they also grow their normal tokens 14-fold, and a 3D sweep with r = 1 ended 2.6-7.2 best-Dice
            points below its iteration 0 at 0-100 % (without: -4.2 to +1.4), so it is off by default
            (Testing/Benchmarks/results/README.md, "3D: a lesion's neighbours"). May differ per dimension,
            ``{"2d": r2, "3d": r3}`` (a missing key = 0); a run's ``config.yaml`` records the value that applied.
        same_transformer_seed: every iteration's Transformers (and fold Transformers) start from iteration 0's
            initialisation and see their batches in iteration 0's order, so iterations differ by their masks
            alone and the per-iteration history (Figure 3) measures what the masks did rather than seed noise.
            Off by default (each iteration its own seed), as the committed results were made.
    """

    max_iterations: int = 5
    threshold_decay: float = 0.125
    constant_threshold: bool = False
    stop_change: float = 0.01
    cross_fit_folds: int = 0
    mask_density_threshold: float | None = None
    spare_shared_uptake: float | dict[str, float | None] | None = None
    mask_dilation: int | dict[str, int] = 0
    same_transformer_seed: bool = False

    def dilation_for(self, dims: int | None) -> int:
        """The ``mask_dilation`` that applies to ``dims``-D scans (it may be one per dimension)."""
        return per_dimension(self.mask_dilation, dims, missing=0)

    def spare_share(self, dims: int | None) -> float | None:
        """The share q that applies to ``dims``-D scans (``spare_shared_uptake`` may be one per dimension)."""
        return per_dimension(self.spare_shared_uptake, dims)

    def check(self, n_scans: int, where: str = "config") -> None:
        """InputError for settings the loop cannot run with."""
        k = self.cross_fit_folds
        if not isinstance(k, int) or k < 0 or k == 1:
            raise InputError(where, f"iltm.cross_fit_folds must be 0 (off) or an integer >= 2, not {k!r}")
        if k > n_scans:
            raise InputError(where, f"iltm.cross_fit_folds={k} needs at least {k} training scans, "
                                    f"there are {n_scans}")
        tau = self.mask_density_threshold
        if tau is not None and not (isinstance(tau, (int, float)) and tau > 0):
            raise InputError(where, f"iltm.mask_density_threshold must be a positive number or null, not {tau!r}")
        q = self.spare_shared_uptake
        shares = list(q.values()) if isinstance(q, dict) else [q]
        if (isinstance(q, dict) and not set(q) <= DIMENSION_KEYS) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1) for v in shares):
            raise InputError(where, "iltm.spare_shared_uptake must be a share between 0 and 1, null, or one per "
                                    f"dimension such as {{2d: null, 3d: 0.25}}, not {q!r}")
        r = self.mask_dilation
        if not _whole_per_dimension(r):
            raise InputError(where, "iltm.mask_dilation must be a whole number of tokens of at least 0, or one per "
                                    f"dimension such as {{2d: 0, 3d: 1}}, not {r!r}")
        if any(v is not None for v in shares) and n_scans < 2:
            raise InputError(where, "iltm.spare_shared_uptake compares training scans with each other: "
                                    f"it needs at least 2, there are {n_scans}")


@dataclass
class Config:
    preset: str = "paper"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    iltm: ILTMConfig = field(default_factory=ILTMConfig)
    version: int = CONFIG_VERSION

    def eps(self) -> float:
        """The KDE regulariser: explicit, or 5 % of the normalised intensity range."""
        if self.detection.eps is not None:
            return float(self.detection.eps)
        return 0.05 * self.data.intensity_range

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS = {
    "data": DataConfig,
    "vqvae": VQVAEConfig,
    "transformer": TransformerConfig,
    "detection": DetectionConfig,
    "iltm": ILTMConfig,
}

# Small models on small cohorts memorise their training lesions, so self-scoring masks almost none of them
# (validation cohort, seed 99, 60 % anomalous: 10 of 71 lesions touched; cross-fitted with mask tau 0.05: 51 of
# 71 at 90 % voxel precision; measured before the dropout fix). See README, "Results". The paper preset keeps
# the paper's self-scoring.
# In 3D the masks also covered normal hot organs (brain, bladder: 1.3 % of tokens at 0 % anomalous, voxel precision
# 28-51 % at 100 %), and masking them made every iteration worse than iteration 0. Sparing tokens that a quarter of
# the other scans match in brightness (3D validation cohorts, synth seeds 98 and 99, 100 % anomalous; best Dice of
# iterations 0..3): seed 99 25.1, 22.3, 21.3 -> 25.1, 24.6, 24.9, 24.6; seed 98 30.7, 29.4, 29.8, 30.0 -> 30.7,
# 30.7 (stopped); mask precision 30 -> 61 % (seed 98). 2D validation (seed 99, 100 %): 50.7, 57.2, 51.9, 60.7 ->
# 50.7, 55.0, 49.0, 60.3. Perfect (label) masks beat iteration 0 by only 0.2-0.7 best Dice in 3D at this scale
# (Testing/Benchmarks/mask_ceiling.py), so the rule's job there is to do no harm. In 2D the masks were already
# precise (87-89 %) and the rule only cut their recall, so 2D keeps the masks as they were.
TRAINING_MASKS = dict(cross_fit_folds=2, mask_density_threshold=0.05, spare_shared_uptake={"3d": 0.25})

# Overrides of the paper defaults. "paper" is the dataclass defaults themselves (DESIGN.md numbers).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "small": {
        "vqvae": dict(channels=[64, 128], num_res_layers=1, num_res_channels=64, num_embeddings=128,
                      embedding_dim=32, epochs=120, batch_size=8, learning_rate=5e-4),
        "transformer": dict(n_layer=6, n_head=4, n_embd=128, epochs=100, batch_size=16, learning_rate=1e-3),
        # Checked on the validation cohorts (synth seed 99, 2D, 48 scans; iteration 0; README, "Results"): small
        # is flat in t, AUROC / best Dice at t = 0.005 / 0.01 / 0.02 / 0.05 / 0.1 / 0.2: 98.9/48.3, 99.1/50.8,
        # 98.9/47.4, 99.0/49.0, 99.0/49.6, 98.9/48.2 (60 %) and 98.8/46.5, 99.2/48.7, 99.2/46.4, 99.2/44.2,
        # 99.2/43.0, 99.5/54.0 (100 %); 0.01 kept. One small run costs ~6x a tiny one (preset_cost.py).
        "detection": dict(samples=40, dropout_passes=4, resampling_threshold=0.01),
        "iltm": dict(max_iterations=4, **TRAINING_MASKS),
    },
    "tiny": {
        # At 2e-3 the 3D VQ-VAE's ReLUs died within a few steps and its codebook collapsed to one code (synthetic
        # PET, 24 scans of 32x24x40, 200 epochs); 5e-4 learns in 2D and 3D (Testing/test_iltm_loop.py).
        # min_steps: 24 3D volumes make 600 steps in batches of 8, too few for some run seeds' codebooks to leave
        # their early plateau; 2400 (batches of 2) lowered the loss of every 3D run seed tried. The 2D VQ-VAE never
        # collapsed and 2400 steps did not raise its best Dice (Testing/Benchmarks/results/README.md). One cohort
        # of ten still collapsed at 2400 steps (12 codes); one retry from another initialisation used 123.
        "vqvae": dict(channels=[32, 64], num_res_layers=1, num_res_channels=32, num_embeddings=128,
                      embedding_dim=32, epochs=200, batch_size=8, learning_rate=5e-4, min_steps={"3d": 2400},
                      collapse_retries={"3d": 1}),
        "transformer": dict(n_layer=3, n_head=4, n_embd=64, epochs=80, batch_size=16, learning_rate=2e-3),
        # A small model trained on a small cohort spreads its probability over more codes than the paper's, so
        # the paper's t = 0.005 flags too few lesion tokens. Chosen on validation cohorts (synth seed 99, 60 % and
        # 100 % anomalous, held-out seed 1099), never on a test set; AUROC / best Dice of iteration 0 at
        # t = 0.02 / 0.05 / 0.1 / 0.2: 99.2/54.5, 99.4/55.1, 99.7/64.8, 99.6/59.3 (60 %) and 99.0/48.6, 99.3/48.7,
        # 99.4/49.3, 99.3/51.4 (100 %). README, "Results".
        "detection": dict(samples=20, dropout_passes=3, resampling_threshold=0.1),
        "iltm": dict(max_iterations=3, **TRAINING_MASKS),
    },
}


def _apply(section_obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in known:
            raise InputError(where, f"unknown setting '{key}' (known: {', '.join(sorted(known))})")
        setattr(section_obj, key, copy.deepcopy(value))


def from_dict(values: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a (possibly partial) nested dict, rejecting unknown keys."""
    cfg = Config()
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise InputError(where, f"section '{key}' must be a mapping")
            _apply(getattr(cfg, key), value, f"{where}: {key}")
        elif key in ("preset", "seed", "device", "version"):
            setattr(cfg, key, value)
        else:
            raise InputError(where, f"unknown section '{key}'")
    return cfg


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise InputError("--preset", f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    cfg = from_dict(PRESETS[name], where=f"preset {name}")
    cfg.preset = name
    return cfg


def load(path: str | Path) -> Config:
    """Read a run's ``config.yaml``; a missing file or a newer format version is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file is missing")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise InputError(path, "config must be a mapping")
    version = values.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise InputError(path, f"written by an incompatible version (config version {version}, "
                               f"this iltm reads {CONFIG_VERSION})")
    return from_dict(values, where=str(path))


def set_dotted(cfg: Config, dotted: str, value: Any) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML, so numbers and lists work)."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as text; a user means the number
            try:
                value = float(value)
            except ValueError:
                pass
    parts = dotted.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if not hasattr(obj, part):
            raise InputError("--set", f"unknown section '{part}' in '{dotted}'")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
        raise InputError("--set", f"unknown setting '{dotted}'")
    setattr(obj, parts[-1], value)
