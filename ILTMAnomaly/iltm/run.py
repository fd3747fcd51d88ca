"""The training run folder: where every stage writes, and what ``detect`` and ``--resume`` read back.

::

    RUN/config.yaml                       full config (preset + overrides), written first
    RUN/manifest.json                     training scans (id, path) and the model's input geometry
    RUN/vqvae.pt                          the trained VQ-VAE (vqvae_checkpoint.pt while it trains)
    RUN/vqvae_attempt<n>.pt               with vqvae.collapse_retries: a partly collapsed VQ-VAE set aside
    RUN/tokens.pt                         token rasters of every training scan (computed once)
    RUN/history.json                      one record per finished ILTM iteration (+ VQ-VAE summary)
    RUN/iteration_000/transformer.pt      that iteration's Transformer (the one ``detect`` uses)
    RUN/iteration_000/folds/transformer_fold<j>.pt  with iltm.cross_fit_folds = K: fitted without fold j,
                                                    it masks fold j's training scans
    RUN/iteration_000/masks/<id>_mask.nii.gz        its binary map of each training scan (scan geometry)
    RUN/iteration_000/token_masks/<id>.npy          the same map on the latent grid (masks iteration 1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as config_mod
from .errors import InputError
from .io import atomic_write_text

RUN_VERSION = 1


@dataclass
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- paths -------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def history_path(self) -> Path:
        return self.root / "history.json"

    @property
    def vqvae_path(self) -> Path:
        return self.root / "vqvae.pt"

    @property
    def tokens_path(self) -> Path:
        return self.root / "tokens.pt"

    def iteration_dir(self, k: int) -> Path:
        return self.root / f"iteration_{k:03d}"

    def transformer_path(self, k: int) -> Path:
        return self.iteration_dir(k) / "transformer.pt"

    def fold_transformer_path(self, k: int, fold: int) -> Path:
        return self.iteration_dir(k) / "folds" / f"transformer_fold{fold}.pt"

    def mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "masks" / f"{scan_id}_mask.nii.gz"

    def token_mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "token_masks" / f"{scan_id}.npy"

    # -- JSON state --------------------------------------------------------------------------------------------
    def read_json(self, path: Path) -> Any:
        if not path.is_file():
            raise InputError(path, "file is missing from the run folder")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(path, "is not valid JSON (the run folder is damaged)") from None

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")

    def history(self) -> dict[str, Any]:
        if not self.history_path.is_file():
            return {"version": RUN_VERSION, "vqvae": None, "iterations": [], "finished": False, "stop_reason": None}
        history = self.read_json(self.history_path)
        if history.get("version") != RUN_VERSION:
            raise InputError(self.history_path, f"written by an incompatible version "
                                                f"(run version {history.get('version')}, this iltm reads {RUN_VERSION})")
        return history

    def manifest(self) -> dict[str, Any]:
        manifest = self.read_json(self.manifest_path)
        if manifest.get("version") != RUN_VERSION:
            raise InputError(self.manifest_path, "written by an incompatible version of iltm")
        return manifest

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    # -- what a finished run offers ---------------------------------------------------------------------------
    def trained_iterations(self) -> list[int]:
        """Iterations whose Transformer exists, in order."""
        found = []
        for d in sorted(self.root.glob("iteration_*")):
            suffix = d.name.split("_", 1)[1]
            if suffix.isdigit() and (d / "transformer.pt").is_file():
                found.append(int(suffix))
        return found

    def check_for_detection(self, iteration: int | None = None) -> int:
        """Check the pieces detection needs; return the iteration to use (default: the last trained one)."""
        if not self.root.is_dir():
            raise InputError(self.root, "run folder does not exist")
        for path in (self.config_path, self.vqvae_path):
            if not path.is_file():
                raise InputError(self.root, f"run folder is missing {path.name} (was training finished?)")
        iterations = self.trained_iterations()
        if not iterations:
            raise InputError(self.root, "run folder has no trained Transformer (no iteration_*/transformer.pt)")
        if iteration is None:
            return iterations[-1]
        if iteration not in iterations:
            raise InputError(self.root, f"iteration {iteration} has no Transformer "
                                        f"(trained iterations: {', '.join(map(str, iterations))})")
        return iteration
