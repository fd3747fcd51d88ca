"""``iltm report``'s figures: a run's per-iteration history and a montage of each iteration's training masks."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .io import read_image
from .run import RunFolder
from .visualize import history_figure, overlay_axes, save_figure


def make_report(run: RunFolder, out: Path, scans: int = 6) -> list[Path]:
    """Write ``history.png`` and ``masks.png`` (the first ``scans`` training scans) into ``out``; returns them."""
    import matplotlib.pyplot as plt

    history = run.history()
    if not history["iterations"]:
        raise InputError(run.root, "run has no finished ILTM iteration to report")
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / "history.png"
    history_figure(history, history_path)
    iterations = [r["iteration"] for r in history["iterations"]]
    images = run.manifest()["images"][:scans]
    units = run.config().data.units
    fig, axes = plt.subplots(len(images), len(iterations) + 1, squeeze=False,
                             figsize=(2.2 * (len(iterations) + 1), 2.2 * len(images)))
    for r, item in enumerate(images):
        image = sitk.GetArrayFromImage(read_image(item["image"], units=units))
        overlay_axes(axes[r, 0], image)
        axes[r, 0].set_title(item["id"], fontsize=8)
        for c, k in enumerate(iterations, start=1):
            mask = sitk.GetArrayFromImage(read_image(run.mask_path(k, item["id"]))) > 0
            overlay_axes(axes[r, c], image, mask=mask)
            if r == 0:
                axes[r, c].set_title(f"iteration {k} mask", fontsize=8)
    montage_path = out / "masks.png"
    save_figure(fig, montage_path)
    return [history_path, montage_path]
