"""A training run folder or a model bundle as the panel sees it: is it complete, what did each ILTM iteration mask,
how did it go.

The names and versions of both are the core's contract, :mod:`iltm.layout`, which needs the standard library only:
browsing a finished run or reading a bundle's ``metadata.json`` works in a Slicer where torch and MONAI are not
installed yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from iltm.errors import InputError
from iltm.layout import CONFIG, VQVAE, RunLayout, is_bundle, read_bundle_metadata

from . import PanelError, segments, volumes


@dataclass
class Scan:
    """One training scan of a run: its id (file stem) and where the image is."""

    id: str
    image: Path


class RunFolder(RunLayout):
    """Read-only view of an ``iltm train`` output folder; its problems are PanelErrors.

    Args:
        root: the run folder.
    """

    def __init__(self, root):
        if root is None or str(root) in ("", "."):
            raise PanelError("Select a trained run folder or a model bundle (.zip) first.")
        super().__init__(root)

    # -- completeness ------------------------------------------------------------------------------------------
    def missing_pieces(self) -> list[str]:
        """What detection needs and the folder lacks (empty when it can be used)."""
        if not self.root.is_dir():
            return [f"the folder {self.root} does not exist"]
        missing = [name for name in (CONFIG, VQVAE) if not (self.root / name).is_file()]
        if not self.trained_iterations():
            missing.append("a trained Transformer (iteration_*/transformer.pt)")
        return missing

    def check_complete(self) -> None:
        """Raise a PanelError naming every missing piece."""
        missing = self.missing_pieces()
        if missing:
            raise PanelError(f"The run folder {self.root} is missing pieces: {', '.join(missing)}. "
                             "Was training finished? 'Resume' in the Train section continues an interrupted run.")

    def iteration_folder(self, iteration: int) -> Path:
        return self.iteration_dir(iteration)

    def resolve_iteration(self, iteration: Optional[int]) -> int:
        """The iteration detection will use: ``iteration`` when trained; when None or negative, the one training
        chose (``history.json``'s ``detection_iteration``), else the last trained one."""
        trained = self.trained_iterations()
        if not trained:
            self.check_complete()
        if iteration is None or iteration < 0:
            chosen = self.history().get("detection_iteration") if self.history_path.is_file() else None
            return chosen if chosen in trained else trained[-1]
        if iteration not in trained:
            fit = (f" Its masks exist; 'iltm train --resume {self.root} --full-fit {iteration}' fits its Transformer."
                   if iteration in self.mask_iterations() else "")
            raise PanelError(f"Iteration {iteration} of {self.root} has no trained Transformer "
                             f"(trained: {', '.join(map(str, trained))}).{fit}")
        return iteration

    # -- contents ----------------------------------------------------------------------------------------------
    def read_json(self, path: Path) -> dict:
        try:
            return super().read_json(path)
        except InputError as error:
            raise PanelError(f"{error}.") from None

    @property
    def spatial_dims(self) -> Optional[int]:
        """2 or 3: from manifest.json, else from ``data.spatial_dims`` in config.yaml; None when unknown."""
        return RunLayout.spatial_dims(self) or _spatial_dims_from_config(self.config_path)

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


class ModelBundle:
    """A model bundle (``iltm export``'s ``.zip``) as the panel sees it: its ``metadata.json``, read with zipfile and
    json only; the same checks :class:`RunFolder` offers detection. A damaged bundle is a PanelError.

    Args:
        path: the ``.zip`` file.
    """

    def __init__(self, path):
        self.root = Path(path)
        try:
            self.metadata = read_bundle_metadata(self.root, verify=True)
        except InputError as error:
            raise PanelError(f"{error}.") from None

    @property
    def iteration(self) -> int:
        return int(self.metadata.get("iteration", 0))

    @property
    def spatial_dims(self) -> Optional[int]:
        dims = self.metadata.get("spatial_dims")
        return int(dims) if dims in (2, 3) else None

    def check_complete(self) -> None:
        """Opening the bundle checked it already."""

    def trained_iterations(self) -> list[int]:
        return [self.iteration]

    def resolve_iteration(self, iteration: Optional[int]) -> int:
        """The bundle's one iteration; asking for another is a PanelError."""
        if iteration is None or iteration < 0 or iteration == self.iteration:
            return self.iteration
        raise PanelError(f"The model bundle {self.root.name} holds ILTM iteration {self.iteration} only "
                         f"(asked for {iteration}); set the iteration to -1 or export that iteration.")

    def description(self) -> str:
        """One line for the panel: what the model was trained on."""
        training = self.metadata.get("training") or {}
        return (f"{self.root.name}: {self.spatial_dims}D model, ILTM iteration {self.iteration}, trained on "
                f"{training.get('scans', '?')} scans ({training.get('date', 'date unknown')}), "
                f"intensities {self.metadata.get('units', 'unknown')}")


def open_model(path):
    """The detection model at ``path``: a :class:`ModelBundle` for a ``.zip``, else a :class:`RunFolder` (a run's
    ``config.yaml`` stands for its folder, so a file dialog can pick a run too)."""
    if path is None or str(path) in ("", "."):
        raise PanelError("Select a trained run folder or a model bundle (.zip) first.")
    path = Path(path)
    if is_bundle(path):
        return ModelBundle(path)
    if path.name == CONFIG and path.is_file():
        path = path.parent
    return RunFolder(path)


def _number(value) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _spatial_dims_from_config(path: Path) -> Optional[int]:
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


def history_plot(scene, run: RunFolder, previous: Optional[HistoryPlot] = None) -> HistoryPlot:
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
