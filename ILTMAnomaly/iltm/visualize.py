"""Figures: 2D overlays, run history, iteration mask montages, demo panels.

3D volumes are shown as a coronal maximum-intensity projection (the view PET readers start from); score maps
as their maximum along the same axis, so a lesion anywhere along the ray shows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path, png_problem  # noqa: E402


def to_view(array: np.ndarray, reduce: str = "max") -> np.ndarray:
    """2D view of a (y, x) or (z, y, x) array: itself, or its projection along y (anterior-posterior)."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array
    projected = array.max(axis=1) if reduce == "max" else array.mean(axis=1)
    return projected[::-1]  # superior at the top, as radiologists expect


def save_figure(fig, path: Path) -> None:
    """Save atomically (temporary name, then rename)."""
    path = Path(path)
    try:
        verify = png_problem if path.suffix.lower() == ".png" else None
        with atomic_path(path, verify=verify) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def overlay_axes(ax, image: np.ndarray, score: np.ndarray | None = None, mask: np.ndarray | None = None,
                 truth: np.ndarray | None = None, score_range: tuple[float, float] | None = None) -> None:
    """Grey image, heat score on top (transparent where low), mask outline in cyan, truth outline in lime."""
    img = to_view(image)
    ax.imshow(img, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5) or 1, interpolation="nearest")
    if score is not None:
        s = to_view(score)
        lo, hi = score_range or (np.percentile(s, 50), np.percentile(s, 99.9))
        alpha = np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1) * 0.8
        ax.imshow(s, cmap="hot", vmin=lo, vmax=hi, alpha=alpha, interpolation="nearest")
    for outline, colour in ((mask, "cyan"), (truth, "lime")):
        if outline is not None and np.any(outline):
            ax.contour(to_view(outline.astype(np.float32)), levels=[0.5], colors=colour, linewidths=0.8)
    ax.set_axis_off()


def save_overlay_png(image: np.ndarray, score: np.ndarray, mask: np.ndarray, path: Path,
                     title: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(4, 4))
    overlay_axes(ax, image, score, mask)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def panel_figure(rows: list[dict[str, np.ndarray]], columns: list[str], path: Path, row_titles: list[str] | None = None,
                 score_columns: frozenset[str] = frozenset()) -> None:
    """One row per case, one column per named map; columns in ``score_columns`` are drawn as heat maps."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(columns):
            ax = axes[r, c]
            array = row[name]
            if name in score_columns:
                view = to_view(array)
                ax.imshow(view, cmap="hot", vmin=np.percentile(view, 1), vmax=np.percentile(view, 99.9),
                          interpolation="nearest")
                ax.set_axis_off()
            else:
                overlay_axes(ax, array)
            if r == 0:
                ax.set_title(name, fontsize=9)
        if row_titles:
            axes[r, 0].text(-0.05, 0.5, row_titles[r], transform=axes[r, 0].transAxes, rotation=90,
                            va="center", ha="right", fontsize=8)
    save_figure(fig, path)


def history_figure(history: dict, path: Path) -> None:
    """Masked-token count, resampling threshold and Transformer loss per ILTM iteration, and where training recorded
    it, the never-flagged tokens' NLL that chose the iteration detection uses (marked)."""
    its = history.get("iterations", [])
    k = [r["iteration"] for r in its]
    selection = [r for r in (history.get("iteration_selection") or {}).get("per_iteration", [])
                 if r.get("reference_nll") is not None]
    fig, axes = plt.subplots(1, 4 if selection else 3, figsize=(14.5 if selection else 11, 3))
    axes[0].plot(k, [r.get("masked_fraction", 0) * 100 for r in its], "o-")
    axes[0].set(xlabel="ILTM iteration", ylabel="masked tokens (%)", title="masked tokens")
    axes[1].plot(k, [r.get("resampling_threshold") for r in its], "o-", color="tab:orange")
    axes[1].set(xlabel="ILTM iteration", ylabel="t", title="resampling threshold")
    axes[2].plot(k, [r.get("transformer_loss") for r in its], "o-", color="tab:green")
    axes[2].set(xlabel="ILTM iteration", ylabel="cross-entropy", title="Transformer loss (last epoch)")
    if selection:
        nll = {r["iteration"]: r["reference_nll"] for r in selection}
        axes[3].plot(list(nll), list(nll.values()), "o-", color="tab:purple")
        used = history.get("detection_iteration")
        if used in nll:
            axes[3].plot([used], [nll[used]], "*", ms=14, color="tab:red", label=f"detection uses {used}")
            axes[3].legend(fontsize=7)
        axes[3].set(xlabel="ILTM iteration", ylabel="mean NLL", title="tokens no iteration flagged")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(k)
    fig.suptitle(history.get("stop_reason") or "", fontsize=8, y=1.04)
    fig.tight_layout()
    save_figure(fig, path)
