"""The training run folder as the core reads and writes it; names and versions are :mod:`iltm.layout`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import config as config_mod
from .errors import InputError
from .io import atomic_write_text
from .layout import RunLayout


class RunFolder(RunLayout):
    """A run folder: :class:`~iltm.layout.RunLayout`'s paths, plus writing state and reading the config."""

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def load_vqvae(self, map_location="cpu"):
        """(VQ-VAE in eval mode, its checkpoint payload)."""
        from .vqvae import load_vqvae

        return load_vqvae(self.vqvae_path, map_location=map_location)

    def load_transformer(self, iteration: int, map_location="cpu"):
        """Iteration ``iteration``'s Transformer."""
        from .transformer import TokenTransformer

        return TokenTransformer.load(self.transformer_path(iteration), map_location=map_location)

    def check_for_detection(self, iteration: int | None = None) -> int:
        """Check the pieces detection needs; return the iteration to use (default: the best one where
        ``iltm.select_iteration=best``, else the one training fitted the full model for, else the last trained one)."""
        if not self.root.is_dir():
            raise InputError(self.root, "run folder does not exist")
        for path in (self.config_path, self.vqvae_path):
            if not path.is_file():
                raise InputError(self.root, f"run folder is missing {path.name} (was training finished?)")
        if self.manifest_path.is_file():
            self.manifest()  # not needed to detect, but a damaged run folder is refused before it is used
        iterations = self.trained_iterations()
        if not iterations:
            raise InputError(self.root, "run folder has no trained Transformer (no iteration_*/transformer.pt)")
        if iteration is None:
            history = self.history()
            cfg = self.config()
            if cfg.iltm.selection_for(cfg.data.spatial_dims) == "best" and history.get("best_iteration") in iterations:
                return history["best_iteration"]
            if history.get("detection_iteration") in iterations:  # the one training fitted the full model for
                return history["detection_iteration"]
            recorded = [r["iteration"] for r in history["iterations"]]
            if recorded and max(recorded) > iterations[-1]:
                last = max(recorded)
                raise InputError(self.transformer_path(last), f"iteration {last} is recorded as finished in "
                                 f"{self.history_path.name} but its Transformer is missing; 'iltm train --resume "
                                 f"{self.root}' redoes it (or choose --iteration {iterations[-1]})")
            return iterations[-1]
        if iteration not in iterations:
            fit = (f"; 'iltm train --resume {self.root} --full-fit {iteration}' fits it"
                   if iteration in self.mask_iterations() else "")
            raise InputError(self.root, f"iteration {iteration} has no full-cohort Transformer (those of iterations "
                                        f"{', '.join(map(str, iterations))} were fitted){fit}")
        return iteration
