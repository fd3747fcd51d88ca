"""``iltm report``'s figures: a run's per-iteration history and a montage of each iteration's training masks."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .io import atomic_path, png_problem, read_image
from .run import RunFolder
from .visualize import history_figure, overlay_axes, save_figure


def make_report(run: RunFolder, out: Path, scans: int = 6) -> list[Path]:
    """Write ``history.png`` and ``masks.png`` (the first ``scans`` training scans) into ``out``; returns them.

    Everything is read and drawn before either figure takes its name, so a report that fails (a missing mask, a
    full disk) leaves neither figure behind, and no ``out`` folder it had to create.
    """
    import matplotlib.pyplot as plt

    history = run.history()
    if not history["iterations"]:
        raise InputError(run.root, "run has no finished ILTM iteration to report")
    iterations = [r["iteration"] for r in history["iterations"]]
    images = run.manifest().get("images", [])[:scans]
    units = run.config().data.units
    if not images:
        raise InputError(run.manifest_path, "lists no training scans to show")
    created = not out.exists()
    history_path, montage_path = out / "history.png", out / "masks.png"
    montage_written = False
    fig, axes = plt.subplots(len(images), len(iterations) + 1, squeeze=False,
                             figsize=(2.2 * (len(iterations) + 1), 2.2 * len(images)))
    try:
        for r, item in enumerate(images):
            image = sitk.GetArrayFromImage(read_image(item["image"], units=units))
            overlay_axes(axes[r, 0], image)
            axes[r, 0].set_title(item["id"], fontsize=8)
            for c, k in enumerate(iterations, start=1):
                mask = sitk.GetArrayFromImage(read_image(run.mask_path(k, item["id"]))) > 0
                overlay_axes(axes[r, c], image, mask=mask)
                if r == 0:
                    axes[r, c].set_title(f"iteration {k} mask", fontsize=8)
        # Both figures go to temporary names first; the history takes its name only once the montage has its own.
        with atomic_path(history_path, verify=png_problem) as history_tmp:
            history_figure(history, history_tmp)
            save_figure(fig, montage_path)
            montage_written = True
    except BaseException:
        plt.close(fig)
        if montage_written:
            montage_path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return [history_path, montage_path]
