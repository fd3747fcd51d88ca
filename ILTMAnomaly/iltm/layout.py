"""The run-folder and output contract: names, suffixes, the format version and the default tau.

Standard library only: the core, the Slicer module's MRML glue (``ILTMAnomalyLib``, which must browse a run in a
Slicer without torch) and the tests' fake CLI all import it, and nothing else spells these names.

::

    RUN/config.yaml                       full config (preset + overrides), written first
    RUN/manifest.json                     training scans (id, path) and the model's input geometry
    RUN/vqvae.pt                          the trained VQ-VAE (vqvae_checkpoint.pt while it trains)
    RUN/vqvae_attempt<n>.pt               with vqvae.collapse_retries: a partly collapsed VQ-VAE set aside
    RUN/tokens.pt                         token rasters of every training scan (computed once)
    RUN/history.json                      one record per finished ILTM iteration (+ VQ-VAE summary)
    RUN/iteration_000/transformer.pt      that iteration's Transformer (the one ``detect`` uses)
    RUN/iteration_000/folds/transformer_fold<j>.pt  with iltm.cross_fit_folds = K: fitted without fold j
    RUN/iteration_000/masks/<id>_mask.nii.gz        its binary map of each training scan (scan geometry)
    RUN/iteration_000/token_masks/<id>.npy          the same map on the latent grid (masks iteration 1)

``iltm detect`` writes ``<id>_score.nii.gz`` (-log density) and ``<id>_mask.nii.gz`` (score > -ln tau) per scan;
with ``--lesions`` also ``<id>_lesions.csv`` per scan and one ``scans.csv`` (per-scan totals) for the folder, with
``--dicom-seg`` on a DICOM series ``<id>_seg.dcm``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, List, Optional

from .errors import InputError

FORMAT_VERSION = 1  # of config.yaml, manifest.json and history.json
DEFAULT_DENSITY_THRESHOLD = 0.005  # tau: a voxel whose density is below it is anomalous

SCORE_SUFFIX = "_score.nii.gz"
MASK_SUFFIX = "_mask.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"
LESIONS_SUFFIX = "_lesions.csv"
DICOM_SEG_SUFFIX = "_seg.dcm"
SCANS_TABLE = "scans.csv"

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
HISTORY = "history.json"
VQVAE = "vqvae.pt"
TOKENS = "tokens.pt"
TRANSFORMER = "transformer.pt"
ITERATION_FOLDER = re.compile(r"^iteration_(\d+)$")


def empty_history() -> dict:
    """``history.json`` of a run that has not finished its first iteration."""
    return {"version": FORMAT_VERSION, "vqvae": None, "iterations": [], "finished": False, "stop_reason": None}


class RunLayout:
    """Where every file of a training run folder lives, and the JSON state read back with its version checked.

    Args:
        root: the run folder.
    """

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY

    @property
    def vqvae_path(self) -> Path:
        return self.root / VQVAE

    @property
    def tokens_path(self) -> Path:
        return self.root / TOKENS

    def iteration_dir(self, k: int) -> Path:
        return self.root / f"iteration_{k:03d}"

    def transformer_path(self, k: int) -> Path:
        return self.iteration_dir(k) / TRANSFORMER

    def fold_transformer_path(self, k: int, fold: int) -> Path:
        return self.iteration_dir(k) / "folds" / f"transformer_fold{fold}.pt"

    def mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "masks" / f"{scan_id}{MASK_SUFFIX}"

    def token_mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "token_masks" / f"{scan_id}.npy"

    def iteration_dirs(self) -> List[tuple]:
        """(k, folder) of every ``iteration_<k>`` folder, ascending."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.root.iterdir()
                 for m in [ITERATION_FOLDER.match(d.name)] if m and d.is_dir()]
        return sorted(found)

    def trained_iterations(self) -> List[int]:
        """Iterations whose Transformer exists, ascending."""
        return [k for k, d in self.iteration_dirs() if (d / TRANSFORMER).is_file()]

    def mask_iterations(self) -> List[int]:
        """Iterations that wrote image-space masks of the training scans, ascending."""
        return [k for k, d in self.iteration_dirs() if (d / "masks").is_dir()]

    def read_json(self, path: Path) -> Any:
        """A JSON object of the run folder whose ``version`` (when present) is ``FORMAT_VERSION``."""
        if not path.is_file():
            raise InputError(path, "file is missing from the run folder")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(path, "is not valid JSON (the run folder is damaged)") from None
        if not isinstance(value, dict):
            raise InputError(path, "is not a JSON object (the run folder is damaged)")
        version = value.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise InputError(path, f"written by an incompatible version (run format version {version}, "
                                   f"this iltm reads {FORMAT_VERSION})")
        return value

    def history(self) -> dict:
        """``history.json``; an empty history when training has not finished its first iteration."""
        return self.read_json(self.history_path) if self.history_path.is_file() else empty_history()

    def manifest(self) -> dict:
        return self.read_json(self.manifest_path)

    def spatial_dims(self) -> Optional[int]:
        """2 or 3 from ``manifest.json``; None when the run has no manifest or it does not say."""
        if not self.manifest_path.is_file():
            return None
        dims = self.manifest().get("spatial_dims")
        return int(dims) if dims in (2, 3) else None
