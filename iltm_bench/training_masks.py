"""How well an ILTM run's training-scan masks cover the true lesions of a synthetic cohort, per iteration.

    python -m iltm_bench.training_masks RUN LABELS [--test-images DIR --test-labels DIR]

RUN is a run folder, LABELS the cohort's ``labels/`` folder (``iltm synth`` writes one). For every iteration it
prints the voxel recall and precision of the masks against the labels and how many lesions (connected regions of
the labels) the masks touch. With ``--test-*`` it also prints, for iteration 0's Transformer, the share of lesion
tokens flagged (p < t) on the training scans against held-out scans: a gap means the Transformer has memorised
its training lesions, which is what cross-fitting (``iltm.cross_fit_folds``) is for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from iltm.detect import Detector, token_mask_from_map
from iltm.io import read_label
from iltm.layout import MASK_SUFFIX
from iltm.run import RunFolder
from iltm.vqvae import encode_tokens


def read_bool(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_label(path)) > 0


def mask_coverage(run: RunFolder, labels: Path) -> list[dict]:
    rows = []
    for k in run.mask_iterations():
        masks = sorted((run.iteration_dir(k) / "masks").glob(f"*{MASK_SUFFIX}"))
        if not masks:
            continue
        tp = fp = fn = lesions = touched = 0
        for path in masks:
            mask = read_bool(path)
            label_path = labels / f"{path.name[:-len(MASK_SUFFIX)]}.nii.gz"
            truth = read_bool(label_path) if label_path.is_file() else np.zeros_like(mask)
            tp += int((mask & truth).sum())
            fp += int((mask & ~truth).sum())
            fn += int((~mask & truth).sum())
            regions, n = ndimage.label(truth)
            lesions += n
            touched += len(set(np.unique(regions[mask])) - {0})
        rows.append({"iteration": k, "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
                     "lesions_touched": touched, "lesions": lesions})
    return rows


@torch.no_grad()
def lesion_tokens_flagged(detector: Detector, images: Path, labels: Path) -> tuple[float, int]:
    """Share of lesion tokens with p < t over the labelled scans in ``images`` (and their count)."""
    flagged = total = 0
    t = detector.cfg.detection.resampling_threshold
    for path in sorted(images.glob("*.nii.gz")):
        label_path = labels / path.name
        if not label_path.is_file():
            continue
        array, _ = detector.preprocessor.forward(sitk.ReadImage(str(path)), where=str(path))
        truth = read_bool(label_path)
        if truth.shape != array.shape[1:]:
            raise SystemExit(f"{label_path}: label grid {truth.shape} differs from the model grid {array.shape[1:]}")
        lesion = token_mask_from_map(torch.from_numpy(truth), detector.cfg.vqvae.downsample_factor).reshape(-1)
        tokens = encode_tokens(detector.vqvae, torch.from_numpy(array)[None].to(detector.device)).reshape(-1)
        probs = detector.transformer.token_probabilities(tokens[None])[0].cpu()
        flagged += int((probs[lesion] < t).sum())
        total += int(lesion.sum())
    return flagged / max(total, 1), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("labels", type=Path, help="labels of the training scans")
    parser.add_argument("--test-images", type=Path)
    parser.add_argument("--test-labels", type=Path)
    args = parser.parse_args()
    run = RunFolder(args.run)
    for r in mask_coverage(run, args.labels):
        print(f"iteration {r['iteration']}: voxel recall {100 * r['recall']:.1f} %, precision "
              f"{100 * r['precision']:.1f} %, lesions touched {r['lesions_touched']} of {r['lesions']}")
    if args.test_images and args.test_labels:
        detector = Detector.from_run(run, 0, device="cpu")
        images = [Path(r["image"]) for r in run.manifest()["images"]]
        train_share, n_train = lesion_tokens_flagged(detector, images[0].parent, args.labels)
        test_share, n_test = lesion_tokens_flagged(detector, args.test_images, args.test_labels)
        print(f"iteration 0 Transformer, lesion tokens with p < t: training scans {100 * train_share:.1f} % "
              f"(of {n_train}), held-out scans {100 * test_share:.1f} % (of {n_test})")


if __name__ == "__main__":
    main()
