"""``iltm demo``: the whole method on a synthetic cohort whose training scans ALL hold lesions.

Synthesise -> train (tiny preset) -> detect on held-out scans with the last ILTM iteration and with iteration 0
(the same pipeline without ILTM) -> evaluate both and an intensity-threshold baseline -> figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import config as config_mod
from .detect import Detector, detect_files
from .errors import InputError
from .evaluate import format_table, load_pairs, summarise
from .io import atomic_write_text, list_images, read_image
from .layout import MASK_SUFFIX, SCORE_SUFFIX
from .progress import Reporter
from .report import make_report
from .synth import SUV_CLIP, make_cohort
from .train import train
from .visualize import panel_figure


def run_demo(out: Path, reporter: Reporter, dims: int = 2, n_train: int = 64, n_test: int = 16, seed: int = 0,
             preset: str = "tiny", max_iterations: int | None = None, overrides: list[str] = ()) -> dict:
    """Synthesise, train, detect with the iteration training chose (the last unless ``iltm.select_iteration=best``)
    and with iteration 0, evaluate against the intensity baseline, draw the figures into ``out``; returns what
    ``results.json`` holds."""

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "demo folder is not empty (choose another --out or delete it)")
    start = time.perf_counter()
    timings = {}

    t = time.perf_counter()
    make_cohort(out / "train", dims=dims, n=n_train, anomalous_fraction=1.0, seed=seed)
    make_cohort(out / "test", dims=dims, n=n_test, anomalous_fraction=0.75, seed=seed + 1)
    timings["synth"] = time.perf_counter() - t
    reporter.log(f"synthesised {n_train} training scans (all with lesions) and {n_test} held-out scans")

    t = time.perf_counter()
    # The phantoms are in SUV: clip them at a fixed SUV unless the user says otherwise.
    overrides = [f"data.clip_value={SUV_CLIP}", *overrides]
    cfg = config_mod.build(preset, overrides=overrides, seed=seed, iltm__max_iterations=max_iterations)
    run = train(out / "run", cfg=cfg, data=out / "train", reporter=reporter, full_fits=[0])

    t = time.perf_counter()
    records = list_images(out / "test" / "images")
    history = run.history()
    last = history["iterations"][-1]["iteration"]
    used = run.check_for_detection()  # the iteration training fitted the full-cohort Transformer for
    # What ILTM kept, and what it would have been without the choice: the last iteration where the guard kept 0,
    # else iteration 0 (the pipeline without ILTM).
    other = (last, "last_iteration") if used == 0 and last != 0 else (0, "without_iltm")
    if other[0] not in run.trained_iterations():
        train(out / "run", resume=True, reporter=reporter, full_fits=[other[0]])
    timings["train"] = time.perf_counter() - start - timings["synth"]
    score_dirs = {}
    for iteration, name in ((used, "iltm"), other):
        if name == "without_iltm" and used == 0:
            break
        detector = Detector.from_run(run, iteration, cfg.device)
        score_dirs[name] = out / "scores" / name
        problems = detect_files(detector, records, score_dirs[name], reporter, seed=seed, png=False)
        if problems:
            raise InputError(out, "; ".join(problems))
    timings["detect"] = time.perf_counter() - t

    labels = out / "test" / "labels"
    rows = {}
    for name, folder in score_dirs.items():
        _, scores, truth = load_pairs(folder, labels)
        label = {"iltm": f"ILTM (iteration {used})", "without_iltm": "VQ-VAE+Transformer (it. 0)",
                 "last_iteration": f"ILTM, last iteration ({last}), not kept"}[name]
        rows[label] = summarise(scores, truth)
    # The baseline a reader of PET starts from: hotter = more suspicious.
    intensities = [sitk.GetArrayFromImage(read_image(r.image)) for r in records]
    truths = [sitk.GetArrayFromImage(read_image(labels / f"{r.id}.nii.gz")) > 0.5 for r in records]
    rows["intensity threshold"] = summarise(intensities, truths)

    figures = make_report(run, out / "report")
    anomalous = [i for i, lab in enumerate(truths) if lab.any()][:4]
    panel_rows = []
    for i in anomalous:
        rid = records[i].id
        score = sitk.GetArrayFromImage(read_image(score_dirs["iltm"] / f"{rid}{SCORE_SUFFIX}"))
        mask = sitk.GetArrayFromImage(read_image(score_dirs["iltm"] / f"{rid}{MASK_SUFFIX}"))
        panel_rows.append({"input": intensities[i], "truth": truths[i].astype(np.float32), "ILTM score": score,
                           "ILTM mask": mask.astype(np.float32)})
    panel_path = out / "report" / "test_cases.png"
    panel_figure(panel_rows, ["input", "truth", "ILTM score", "ILTM mask"], panel_path,
                 row_titles=[records[i].id for i in anomalous], score_columns=frozenset({"ILTM score"}))
    figures.append(panel_path)

    timings["total"] = time.perf_counter() - start
    table = format_table(rows)
    results = {"metrics": {k: {m: v[m] for m in v if m != "per_image"} for k, v in rows.items()},
               "history": history, "timings_seconds": timings, "figures": [str(p) for p in figures]}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    print()
    print(table)
    print(f"\nILTM stopped after iteration {last}: {history['stop_reason']}"
          + ("" if used == last else f"; detection uses iteration {used} ({history.get('selection_reason')})"))
    print(f"time: {timings['total'] / 60:.1f} min (train {timings['train'] / 60:.1f} min)")
    print(f"run folder:     {run.root}")
    print(f"score maps:     {out / 'scores'}")
    print(f"figures:        {', '.join(str(p) for p in figures)}")
    print(f"results (JSON): {out / 'results.json'}")
    reporter.emit("done", out=str(out))
    return results
