"""How the training-scan masks of an ILTM iteration would look under other rules for their density threshold tau:
the absolute tau (``iltm.mask_density_threshold``), a quantile of the cohort's own voxel log densities (a fixed
share of voxels), and a robust outlier rule (median - c x MAD of the log densities). For each rule: the share of
tokens masked and the voxel precision and recall of the masked tokens' footprints against the training labels.

    python -m iltm_bench.mask_rules RUN LABELS [--iteration 0]

The log densities are recomputed the way training made them (each scan scored by the fold detector that did not
see it, with training's seed for that scan and iteration, without sparing shared uptake); labels on the model grid.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from iltm.detect import Detector, token_mask_from_map
from iltm.errors import InputError
from iltm.run import RunFolder
from iltm.train import fold_of, iteration_threshold, training_scan_generator
from iltm.transformer import TokenTransformer

ABSOLUTE = (0.005, 0.01, 0.05, 0.1)
QUANTILES = (0.005, 0.01, 0.02, 0.05)
MAD_FACTORS = (3.0, 5.0, 8.0)


def held_out_log_densities(run: RunFolder, labels: Path, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(M, *spatial) log densities and lesion labels of the training scans on the model grid, and the token size."""
    cfg = run.config()
    base = Detector.from_run(run, k, "cpu")
    folds = cfg.iltm.cross_fit_folds
    paths = [run.fold_transformer_path(k, j) for j in range(folds)] if folds else [run.transformer_path(k)]
    detectors = [Detector(cfg, base.vqvae, TokenTransformer.load(p), base.latent_shape, base.device) for p in paths]
    threshold = iteration_threshold(cfg, k)
    logs, truths = [], []
    for i, entry in enumerate(run.manifest()["images"]):
        image = sitk.ReadImage(str(entry["image"]))
        array, _ = base.preprocessor.forward(image, where=str(entry["image"]))
        generator = training_scan_generator(cfg, k, i, base.device)
        result = detectors[fold_of(i, len(detectors))].detect_array(torch.from_numpy(array), threshold, generator)
        label_path = labels / f"{entry['id']}.nii.gz"
        if not label_path.is_file():
            raise InputError(label_path, "no label for this training scan")
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0.5
        if truth.size != result.log_density.numel():
            raise InputError(label_path, f"label grid {truth.shape} is not the model grid "
                                         f"{tuple(result.log_density.shape)}")
        logs.append(result.log_density.numpy())
        truths.append(truth.reshape(result.log_density.shape))
    return np.stack(logs), np.stack(truths), cfg.vqvae.downsample_factor


def evaluate(log_density: np.ndarray, truth: np.ndarray, factor: int, log_tau: float) -> dict:
    """Token share masked and the voxel precision / recall of the masked tokens' footprints at log tau."""
    tokens = torch.stack([token_mask_from_map(torch.from_numpy(v), factor) for v in log_density < log_tau]).numpy()
    footprint = tokens
    for axis in range(1, tokens.ndim):
        footprint = footprint.repeat(factor, axis=axis)
    tp = int((footprint & truth).sum())
    return {"log_tau": log_tau, "tokens": float(tokens.mean()), "precision": tp / max(int(footprint.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1)}


def rules(log_density: np.ndarray, truth: np.ndarray, factor: int) -> list[dict]:
    rows = [{"rule": f"absolute tau {tau:g}", **evaluate(log_density, truth, factor, math.log(tau))}
            for tau in ABSOLUTE]
    rows += [{"rule": f"{q:g}-quantile of the log densities",
              **evaluate(log_density, truth, factor, float(np.quantile(log_density, q)))} for q in QUANTILES]
    median = float(np.median(log_density))
    mad = 1.4826 * float(np.median(np.abs(log_density - median)))
    rows += [{"rule": f"median - {c:g} MAD", **evaluate(log_density, truth, factor, median - c * mad)}
             for c in MAD_FACTORS]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iltm_bench.mask_rules", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("labels", type=Path, help="the training cohort's labels/ folder")
    parser.add_argument("--iteration", type=int, default=0)
    args = parser.parse_args(argv)
    log_density, truth, factor = held_out_log_densities(RunFolder(args.run), args.labels, args.iteration)
    print(f"{args.run}, iteration {args.iteration}: lesion voxels {100 * truth.mean():.2f} %, median log density "
          f"{np.median(log_density):.3f}\n")
    print("| rule | log tau | tokens masked | voxel precision | voxel recall |\n|---|---|---|---|---|")
    for r in rules(log_density, truth, factor):
        print(f"| {r['rule']} | {r['log_tau']:.3f} | {100 * r['tokens']:.1f} % | {100 * r['precision']:.1f} % | "
              f"{100 * r['recall']:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
