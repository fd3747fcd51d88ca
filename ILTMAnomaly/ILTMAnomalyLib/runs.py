"""A training run folder as the panel sees it: is it complete, what did each ILTM iteration mask, how did it go.

The folder is the core's contract (see ``iltm.run``)::

    RUN/config.yaml, RUN/manifest.json, RUN/vqvae.pt, RUN/history.json
    RUN/iteration_000/transformer.pt
    RUN/iteration_000/masks/<id>_mask.nii.gz     binary map of training scan <id>, on that scan's geometry

It is read here with ``json`` alone, without importing the core, so browsing a finished run works in a Slicer
where torch and MONAI are not installed yet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PanelError, RUN_FOLDER_VERSION, segments, volumes

ITERATION_FOLDER = re.compile(r"^iteration_(\d+)$")


@dataclass
class Scan:
    """One training scan of a run: its id (file stem) and where the image is."""

    id: str
    image: Path


class RunFolder:
    """Read-only view of an ``iltm train`` output folder.

    Args:
        root: the run folder.
    """

    def __init__(self, root):
        if root is None or str(root) in ("", "."):
            raise PanelError("Select a trained run folder first.")
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- completeness ------------------------------------------------------------------------------------------
    def missing_pieces(self) -> list[str]:
        """What detection needs and the folder lacks (empty when it can be used)."""
        if not self.root.is_dir():
            return [f"the folder {self.root} does not exist"]
        missing = [name for name in ("config.yaml", "vqvae.pt") if not (self.root / name).is_file()]
        if not self.trained_iterations():
            missing.append("a trained Transformer (iteration_*/transformer.pt)")
        return missing

    def check_complete(self) -> None:
        """Raise a PanelError naming every missing piece."""
        missing = self.missing_pieces()
        if missing:
            raise PanelError(f"The run folder {self.root} is missing pieces: {', '.join(missing)}. "
                             "Was training finished? 'Resume' in the Train section continues an interrupted run.")

    def trained_iterations(self) -> list[int]:
        """Iterations whose Transformer exists, ascending."""
        return [k for k, folder in self._iteration_folders() if (folder / "transformer.pt").is_file()]

    def mask_iterations(self) -> list[int]:
        """Iterations that wrote image-space masks of the training scans, ascending."""
        return [k for k, folder in self._iteration_folders() if (folder / "masks").is_dir()]

    def _iteration_folders(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            match = ITERATION_FOLDER.match(folder.name)
            if match and folder.is_dir():
                found.append((int(match.group(1)), folder))
        return sorted(found)

    def iteration_folder(self, iteration: int) -> Path:
        return self.root / f"iteration_{iteration:03d}"

    def resolve_iteration(self, iteration: int | None) -> int:
        """The iteration detection will use: ``iteration`` when trained, the last one when None or negative."""
        trained = self.trained_iterations()
        if not trained:
            self.check_complete()
        if iteration is None or iteration < 0:
            return trained[-1]
        if iteration not in trained:
            raise PanelError(f"Iteration {iteration} of {self.root} has no trained Transformer "
                             f"(trained: {', '.join(map(str, trained))}).")
        return iteration

    # -- contents ----------------------------------------------------------------------------------------------
    def _json(self, name: str) -> dict:
        path = self.root / name
        if not path.is_file():
            raise PanelError(f"The run folder {self.root} has no {name}.")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PanelError(f"{path} is damaged ({error}).") from None
        if not isinstance(value, dict):
            raise PanelError(f"{path} is damaged (not a JSON object).")
        version = value.get("version")
        if version is not None and version != RUN_FOLDER_VERSION:
            raise PanelError(f"{path} was written by an incompatible version of iltm (version {version}, "
                             f"this panel reads {RUN_FOLDER_VERSION}).")
        return value

    def manifest(self) -> dict:
        return self._json("manifest.json")

    def history(self) -> dict:
        """``history.json``; an empty history when training has not finished its first iteration."""
        if not (self.root / "history.json").is_file():
            return {"version": RUN_FOLDER_VERSION, "iterations": [], "finished": False, "stop_reason": None}
        return self._json("history.json")

    @property
    def spatial_dims(self) -> int | None:
        """2 or 3: from manifest.json, else from ``data.spatial_dims`` in config.yaml; None when unknown."""
        if (self.root / "manifest.json").is_file():
            dims = self.manifest().get("spatial_dims")
            if dims in (2, 3):
                return int(dims)
        return _spatial_dims_from_config(self.root / "config.yaml")

    def scans(self) -> list[Scan]:
        """The training scans, in manifest order."""
        scans = []
        for entry in self.manifest().get("images", []):
            if isinstance(entry, dict) and "id" in entry and "image" in entry:
                image = Path(entry["image"])
                scans.append(Scan(str(entry["id"]), image if image.is_absolute() else self.root / image))
        return scans

    def scan(self, scan_id: str) -> Scan:
        for scan in self.scans():
            if scan.id == scan_id:
                return scan
        raise PanelError(f"The run {self.root} has no training scan '{scan_id}'.")

    def mask_path(self, iteration: int, scan_id: str) -> Path:
        return self.iteration_folder(iteration) / "masks" / f"{scan_id}_mask.nii.gz"

    def history_arrays(self) -> dict[str, np.ndarray]:
        """One array per history field, aligned on ``iteration`` (NaN where an iteration lacks the value).

        Keys: iteration, resampling_threshold, masked_tokens, masked_change, transformer_loss, train_seconds,
        detect_seconds.
        """
        records = sorted((r for r in self.history().get("iterations", []) if isinstance(r, dict) and "iteration" in r),
                         key=lambda r: r["iteration"])
        fields = ("iteration", "resampling_threshold", "masked_tokens", "masked_change", "transformer_loss",
                  "train_seconds", "detect_seconds")
        return {field: np.array([_number(r.get(field)) for r in records], dtype=float) for field in fields}


def _number(value) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _spatial_dims_from_config(path: Path) -> int | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        import yaml

        value = (yaml.safe_load(text) or {}).get("data", {}).get("spatial_dims")
        return int(value) if value in (2, 3) else None
    except ImportError:
        # Fresh Slicer without PyYAML yet: the key is a plain scalar, a regular expression is enough.
        match = re.search(r"^\s+spatial_dims:\s*([23])\s*$", text, re.MULTILINE)
        return int(match.group(1)) if match else None
    except Exception:
        return None


# -- MRML: the iteration browser ------------------------------------------------------------------------------

def load_iteration_scan(scene, run: RunFolder, iteration: int, scan_id: str, previous=()):
    """Load training scan ``scan_id`` and the mask iteration ``iteration`` gave it, as a volume + segmentation.

    Both nodes are created only after both files were read; ``previous`` nodes (the browser's last pair) are
    removed only then, so a failure leaves the scene exactly as it was.

    Returns:
        (volume node, segmentation node).
    """
    scan = run.scan(scan_id)
    mask_path = run.mask_path(iteration, scan_id)
    if not scan.image.is_file():
        raise PanelError(f"Training scan '{scan_id}' is not at {scan.image} any more (moved or deleted?).")
    if not mask_path.is_file():
        available = run.mask_iterations()
        raise PanelError(f"Iteration {iteration} has no mask for '{scan_id}' ({mask_path} is missing; iterations "
                         f"with masks: {', '.join(map(str, available)) or 'none'}).")
    # Both files are read and checked before anything enters the scene.
    volume = volumes.read_volume(None, scan.image, f"{scan_id} (ILTM training scan)")
    mask = volumes.read_volume(None, mask_path, f"{scan_id} iteration {iteration} mask", labelmap=True)
    if not volumes.same_geometry(mask, volume):
        raise PanelError(f"{mask_path} does not lie on the grid of {scan.image}.")
    volumes.add_volume(scene, volume)
    try:
        segmentation = segments.segmentation_from_labelmap(
            scene, mask, volume, f"{scan_id} iteration {iteration} anomaly mask", per_component=False)
    except Exception:
        volumes.remove_node(scene, volume)
        raise
    for node in previous:
        volumes.remove_node(scene, node)
    return volume, segmentation


@dataclass
class HistoryPlot:
    """The nodes of a run's history plot; ``nodes`` lists all of them, to remove them in one go."""

    table: object
    masked_tokens_chart: object
    threshold_chart: object
    nodes: list


def history_plot(scene, run: RunFolder, previous: HistoryPlot | None = None) -> HistoryPlot:
    """Table and two charts of the run's history: masked-token count and resampling threshold per iteration.

    The two quantities differ by orders of magnitude, so each gets its own chart (Slicer plots have one y axis).
    ``previous`` (the browser's last plot) is removed once the new one exists.
    """
    import slicer
    import vtk

    arrays = run.history_arrays()
    if arrays["iteration"].size == 0:
        raise PanelError(f"The run {run.root} has no finished ILTM iteration yet (history.json is empty).")

    nodes = []
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{run.root.name} ILTM history")
    nodes.append(table)
    columns = (("iteration", arrays["iteration"]), ("masked_tokens", arrays["masked_tokens"]),
               ("resampling_threshold", arrays["resampling_threshold"]),
               ("masked_change_percent", 100.0 * arrays["masked_change"]))
    for name, values in columns:
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        column.SetNumberOfTuples(len(values))
        for row, value in enumerate(values):
            column.SetValue(row, float(value))
        table.GetTable().AddColumn(column)
    table.Modified()

    charts = []
    for column, title, axis in (("masked_tokens", "ILTM masked tokens", "masked tokens"),
                                ("resampling_threshold", "ILTM resampling threshold", "resampling threshold t")):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{run.root.name} {axis}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{run.root.name} {title}")
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(title)
        chart.SetXAxisTitle("ILTM iteration")
        chart.SetYAxisTitle(axis)
        chart.SetLegendVisibility(False)
        nodes += [series, chart]
        charts.append(chart)

    if previous is not None:
        for node in previous.nodes:
            volumes.remove_node(scene, node)
    return HistoryPlot(table, charts[0], charts[1], nodes)
