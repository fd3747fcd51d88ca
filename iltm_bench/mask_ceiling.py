"""How much could ILTM's training masks gain at best, on a finished sweep? The ceiling of one iteration.

    python -m iltm_bench.mask_ceiling SWEEP --fraction 1 [--variants truth dilated clean none right wrong]
                                              [--refits R] [--device cpu]

SWEEP is an ``iltm benchmark --out`` folder whose ILTM run at ``--fraction`` has finished iteration 0. For every
variant, iteration 1's Transformer is fitted again, exactly as the loop fits it (same seed, same code), from the
run's VQ-VAE tokens with iteration 0's training masks replaced by:

- ``truth``: every token whose footprint holds a lesion voxel of the cohort's labels, and nothing else: perfect
  masks, the most an iteration can gain;
- ``none``: no mask at all: the Transformer fitted once more, which measures what refitting alone changes;
- ``dilated``: ``truth`` grown by one token along every axis and diagonal (what the removed ``iltm.mask_dilation`` = 1 did): a lesion
  changes the codes of its footprint's neighbours too (the encoder's receptive field, the scanner's blur);
- ``clean``: no masks, but the tokens of the same subjects without their lesions: the sweep's 0 % cohort (drawn
  with the same seed, so the same anatomy; ``iltm synth``) encoded by this run's VQ-VAE. The most any mask can give:
  what the Transformer would learn from lesion-free scans of the same patients, the VQ-VAE unchanged;
- ``right``: the run's own iteration-0 masks, only the tokens that hold a lesion voxel (what they got right);
- ``wrong``: the run's own iteration-0 masks, only the tokens that hold none (normal tokens masked).

With ``clean``, a second table says how far a lesion reaches into the codes: per distance from the nearest lesion
token, the share of tokens whose code differs from the same subject's lesion-free one.

``right`` and ``wrong`` split what the sweep's own iteration 1 gains and loses: the gain of the lesion tokens it
masked against the cost of the normal tokens it masked, each measured against ``none``.

Each is scored on the sweep's test set like the sweep scores its iterations. The table puts them beside the sweep's
own iteration 0 and iteration 1 (``iltm_iterations.csv``): if ``truth`` is barely above ``none``, no mask rule
can make the iterations help on these data, and the iterations' losses come from masked normal tokens.

A single refit moves best Dice by 2-3 points with its seed alone (3D tiny), as much as most masks do. ``--refits R``
fits every variant R times, the first with the loop's seed and the others with seeds R - 1 further on, and
tables the mean and standard deviation over the refits: a difference counts only when it is well beyond that.

The work goes to ``SWEEP/fraction_F/ceiling/VARIANT/`` (a run folder and test score maps; refit r > 0 in
``.../VARIANT/refit<r>/``); a rerun reuses what is there. The table is printed and written to
``SWEEP/mask_ceiling_F.md`` (kept with the sweep's tables); nothing else of the sweep is changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from iltm_bench.sweep import (ITERATIONS_CSV, SETTINGS_JSON, SweepSettings, evaluate_iteration, fraction_text,
                            read_table)
from iltm.detect import resolve_device, token_mask_from_map
from iltm.errors import InputError
from iltm.evaluate import METRICS
from iltm.io import atomic_write_text, list_images, read_label
from iltm.progress import Reporter
from iltm.run import RunFolder
from iltm.checkpoint import load_checkpoint
from iltm.preprocess import Preprocessor
import torch.nn.functional as F
from iltm.train import TrainingSet, load_token_masks, tokenize_stage, train_transformer_stage
from iltm.vqvae import load_vqvae

VARIANTS = ("truth", "dilated", "clean", "none", "right", "wrong")
DEFAULT_VARIANTS = ("truth", "none")
REFIT_SEED_STEP = 1009  # refit r fits with the run's seed + r x this (apart from every seed the loop itself uses)
LABELS = {"truth": "perfect masks (the labels)", "dilated": "the labels' tokens and their neighbours",
          "clean": "no masks, the same subjects without lesions", "none": "no masks",
          "right": "its own masks' lesion tokens only", "wrong": "its own masks' normal tokens only"}


def truth_token_masks(run: RunFolder, labels: Path) -> torch.Tensor:
    """(M, L) bool: the tokens of each training scan whose footprint holds a lesion voxel (no label = none)."""
    cfg = run.config()
    factor = cfg.vqvae.downsample_factor
    grid = [int(s) for s in cfg.data.spatial_size][::-1]                 # numpy order
    rows = []
    for rec in run.manifest()["images"]:
        path = labels / f"{rec['id']}.nii.gz"
        truth = sitk.GetArrayFromImage(read_label(path)) > 0 if path.is_file() else np.zeros(grid, bool)
        if list(truth.shape) != grid:
            raise InputError(path, f"label grid {list(truth.shape)} differs from the model grid {grid} (numpy "
                                   "order): this script needs cohorts drawn on the model grid, as iltm synth draws them")
        rows.append(token_mask_from_map(torch.from_numpy(truth), factor).reshape(-1))
    return torch.stack(rows)


def own_token_masks(run: RunFolder) -> torch.Tensor:
    """(M, L) bool: the run's iteration-0 training masks (what its iteration 1 was fitted with)."""
    return load_token_masks(run, 0, [rec["id"] for rec in run.manifest()["images"]]).bool()


def latent_shape(run: RunFolder) -> list[int]:
    """The token grid (numpy order) of the run's model grid."""
    cfg = run.config()
    return [int(s) // cfg.vqvae.downsample_factor for s in cfg.data.spatial_size][::-1]


def dilate_tokens(token_mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(*latent) bool: ``token_mask`` grown by ``radius`` tokens along every axis and diagonal (a cube of side
    2 radius + 1)."""
    if radius <= 0:
        return token_mask
    pool = F.max_pool2d if token_mask.dim() == 2 else F.max_pool3d
    return pool(token_mask.float()[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


def dilate_rows(masks: torch.Tensor, latent: list[int], radius: int) -> torch.Tensor:
    """(M, L) bool: every row of ``masks`` (M, L) grown by ``radius`` tokens on the ``latent`` grid (numpy order)."""
    return torch.stack([dilate_tokens(m.reshape(latent), radius).reshape(-1) for m in masks])


def variant_masks(variant: str, truth: torch.Tensor, own: torch.Tensor | None = None,
                  latent: list[int] | None = None) -> torch.Tensor:
    if variant == "truth":
        return truth.clone()
    if variant == "dilated":
        if latent is None:
            raise InputError("--variants", "variant 'dilated' needs the token grid")
        return dilate_rows(truth, latent, 1)
    if variant in ("none", "clean"):
        return torch.zeros_like(truth)
    if variant in ("right", "wrong"):
        if own is None:
            raise InputError("--variants", f"variant '{variant}' needs the run's own iteration-0 masks")
        return own & truth if variant == "right" else own & ~truth
    raise InputError("--variants", f"unknown variant '{variant}' (known: {', '.join(VARIANTS)})")


def prepare_run(source: RunFolder, root: Path) -> RunFolder:
    """A run folder at ``root`` holding the source's config, manifest and VQ-VAE (what iteration 1 needs)."""
    run = RunFolder(root)
    if not run.vqvae_path.is_file():
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for path in (source.config_path, source.manifest_path, source.vqvae_path):
            shutil.copy2(path, partial / path.name)
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    return run


def clean_tokens(run: RunFolder, clean: Path, device: str, reporter: Reporter) -> torch.Tensor:
    """(M, L): the run's VQ-VAE's tokens of ``clean``'s images (the same subjects without lesions), cached in
    ``run``'s own tokens file."""
    records = list_images(clean / "images") if (clean / "images").is_dir() else []
    if [rec.id for rec in records] != [rec["id"] for rec in run.manifest()["images"]]:
        raise InputError(clean, "variant 'clean' needs the sweep's 0 % cohort with the same scan ids as this "
                                "fraction's (run the sweep at fraction 0 with the same --seed and --n-train)")
    cfg = run.config()
    data = TrainingSet(records, Preprocessor(cfg.data, cfg.vqvae.downsample_factor), reporter)
    where = resolve_device(device)
    vqvae, _ = load_vqvae(run.vqvae_path, map_location=where)
    return tokenize_stage(run, data, vqvae, where, reporter)


def ceiling(sweep: Path, fraction: float, variants: list[str], device: str, reporter: Reporter,
            refits: int = 1) -> list[dict]:
    settings_path = sweep / SETTINGS_JSON
    if not settings_path.is_file():
        raise InputError(sweep, f"not a benchmark folder ({SETTINGS_JSON} missing)")
    saved = json.loads(settings_path.read_text(encoding="utf-8"))["settings"]
    folder = sweep / f"fraction_{fraction_text(fraction)}"
    source = RunFolder(folder / "runs" / "iltm")
    if not source.transformer_path(0).is_file() or not source.tokens_path.is_file():
        raise InputError(source.root, "the sweep's ILTM run has no finished iteration 0 at this fraction")
    settings = SweepSettings(out=sweep, dims=saved["dims"], n_train=saved["n_train"], n_test=saved["n_test"],
                             seed=saved["seed"], test_seed=saved["test_seed"], device=device,
                             test_threshold=saved.get("test_threshold", "fixed"))
    test_records = list_images(sweep / "test" / "images")
    labels = sweep / "test" / "labels"
    cfg = source.config()
    tokens = load_checkpoint(source.tokens_path, "iltm-tokens", 1)["tokens"]
    truth = truth_token_masks(source, folder / "train" / "labels")
    own = None
    if {"right", "wrong"} & set(variants):
        if not all(source.token_mask_path(0, rec["id"]).is_file() for rec in source.manifest()["images"]):
            raise InputError(source.root, "variants right and wrong need iteration 0's training masks, and the "
                                          "sweep's ILTM run has not written them all at this fraction")
        own = own_token_masks(source)
    latent = latent_shape(source)
    if not (isinstance(refits, int) and refits >= 1):
        raise InputError("--refits", f"must be a whole number of at least 1, not {refits!r}")
    rows = []
    for variant in variants:
        masks = variant_masks(variant, truth, own, latent)
        fitted_on = None
        per_refit = []
        for r in range(refits):
            where = folder / "ceiling" / variant / (f"refit{r}" if r else "")
            run = prepare_run(source, where / "run")
            if not run.transformer_path(1).is_file():
                if fitted_on is None:
                    fitted_on = (clean_tokens(run, sweep / "fraction_0" / "train", device, reporter)
                                 if variant == "clean" else tokens)
                reporter.log(f"{variant}: fitting iteration 1's Transformer with {int(masks.sum())} masked tokens"
                             + (f" (refit {r + 1} of {refits})" if refits > 1 else ""))
                train_transformer_stage(run, replace(cfg, seed=cfg.seed + REFIT_SEED_STEP * r), 1, fitted_on, masks,
                                        cfg.vqvae.num_embeddings, resolve_device(device), reporter, units=1.0)
            reporter.log(f"{variant}: scoring the test set")
            metrics, _ = evaluate_iteration(run, 1, settings, test_records, labels, where / "scores", reporter)
            per_refit.append([float(metrics[k]) for k in METRICS])
        values = np.array(per_refit)
        rows.append({"what": f"iteration 1, {LABELS[variant]}", "masked_tokens": int(masks.sum()), "refits": refits,
                     **dict(zip(METRICS, values.mean(0).tolist())),
                     **({f"{k}_sd": v for k, v in zip(METRICS, values.std(0, ddof=1).tolist())} if refits > 1 else {})})
    return sweep_rows(sweep, fraction) + rows


def code_changes(tokens: torch.Tensor, clean: torch.Tensor, truth: torch.Tensor, latent: list[int],
                 farthest: int = 3) -> list[dict]:
    """How far a lesion reaches into the codes: per distance d from the nearest lesion token (in tokens, along
    every axis and diagonal), the tokens at d and how many of them differ from the same subject's lesion-free code.

    Args:
        tokens, clean: (M, L) codes of the lesioned scans and of the same subjects without lesions (one VQ-VAE).
        truth: (M, L) bool, the tokens whose footprint holds a lesion voxel (d = 0).
        latent: the token grid (numpy order).
    """
    changed = tokens != clean
    inner = torch.zeros_like(truth)
    rows = []
    for d in range(farthest + 1):
        within = dilate_rows(truth, latent, d)
        ring = within & ~inner
        rows.append({"distance": str(d), "tokens": int(ring.sum()), "changed": int((changed & ring).sum())})
        inner = within
    rows.append({"distance": f"more than {farthest}", "tokens": int((~inner).sum()),
                 "changed": int((changed & ~inner).sum())})
    return rows


def clean_code_changes(sweep: Path, fraction: float) -> list[dict]:
    """``code_changes`` of the sweep's cohort at ``fraction`` against the 0 % cohort's tokens cached by variant
    ``clean`` (run it first)."""
    folder = sweep / f"fraction_{fraction_text(fraction)}"
    source = RunFolder(folder / "runs" / "iltm")
    clean = RunFolder(folder / "ceiling" / "clean" / "run")
    tokens, clean_tokens_ = (load_checkpoint(run.tokens_path, "iltm-tokens", 1)["tokens"] for run in (source, clean))
    return code_changes(tokens, clean_tokens_, truth_token_masks(source, folder / "train" / "labels"),
                        latent_shape(source))


def sweep_rows(sweep: Path, fraction: float) -> list[dict]:
    """The sweep's own iterations 0 and 1 (decreasing threshold) at this fraction, from ``iltm_iterations.csv``."""
    rows = []
    for r in read_table(sweep / ITERATIONS_CSV):
        if (r["threshold_schedule"] == "decreasing" and abs(r["anomalous_fraction"] - fraction) < 1e-9
                and r["iteration"] in (0, 1)):
            k = int(r["iteration"])
            rows.append({"what": f"sweep: iteration {k}" + (", its own masks" if k == 1 else ""),
                         "masked_tokens": None, **{m: r[m] for m in METRICS}})
    return rows


def table(rows: list[dict], fraction: float, changes: list[dict] | None = None) -> str:
    refits = max(r.get("refits", 1) for r in rows)
    spread = f"; refits: mean ± sd over {refits} seeds" if refits > 1 else ""
    lines = [f"Mask ceiling at {100 * fraction:g} % anomalous (test set; AUROC, AUPRO, best Dice in %{spread})", "",
             "| | masked tokens | AUROC | AUPRO | best Dice |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        masked = "" if r["masked_tokens"] is None else str(r["masked_tokens"])
        cells = [f"{100 * r[k]:.2f}" + (f" ± {100 * r[k + '_sd']:.2f}" if k + "_sd" in r else "") for k in METRICS]
        lines.append(f"| {r['what']} | {masked} | " + " | ".join(cells) + " |")
    if changes:
        lines += ["", "Codes that differ from the same subject's lesion-free code (variant clean's tokens), by "
                      "distance from the nearest lesion token:", "",
                  "| distance (tokens) | tokens | changed |", "|---|---:|---:|"]
        lines += [f"| {c['distance']} | {c['tokens']} | {c['changed']} ({100 * c['changed'] / max(c['tokens'], 1):.1f}"
                  " %) |" for c in changes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--fraction", type=float, required=True)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--refits", type=int, default=1, help="fits per variant, each with its own seed (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        rows = ceiling(args.sweep, args.fraction, args.variants, args.device, Reporter("bar"), refits=args.refits)
    except InputError as exc:
        parser.exit(2, f"error: {exc}\n")
    changes = clean_code_changes(args.sweep, args.fraction) if "clean" in args.variants else None
    text = table(rows, args.fraction, changes)
    print(text, end="")
    atomic_write_text(args.sweep / f"mask_ceiling_{fraction_text(args.fraction)}.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
