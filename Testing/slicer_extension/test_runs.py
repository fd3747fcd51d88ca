"""Iteration-browser data from a run folder, and its MRML: scan + mask segmentation, history plot."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from ILTMAnomalyLib import PanelError, jobs, runs, segments, volumes

from mrml_helpers import count_nodes, write_cohort


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run folder as ``iltm train`` lays it out, written by the fake CLI (3 iterations, 2 scans)."""
    import sys

    from mrml_helpers import FAKE_CLI

    root = tmp_path_factory.mktemp("fake_run")
    data = write_cohort(root / "data")
    job = jobs.CliJob(["train", "--data", str(data), "--out", str(root / "run"), "--max-iterations", "2"],
                      command=[sys.executable, str(FAKE_CLI)], env={"FAKE_ILTM_STEPS": "1"}).start()
    assert job.wait(timeout=120) is jobs.JobState.SUCCEEDED, job.error_message
    return runs.RunFolder(root / "run")


def test_run_folder_contents(fake_run):
    assert fake_run.missing_pieces() == []
    assert fake_run.trained_iterations() == [0, 1, 2]
    assert fake_run.mask_iterations() == [0, 1, 2]
    assert fake_run.spatial_dims == 3
    assert [scan.id for scan in fake_run.scans()] == ["case000", "case001"]
    assert fake_run.scan("case001").image.is_file()
    assert fake_run.mask_path(1, "case000").is_file()
    assert fake_run.resolve_iteration(None) == 2 and fake_run.resolve_iteration(1) == 1
    history = fake_run.history_arrays()
    np.testing.assert_array_equal(history["iteration"], [0, 1, 2])
    np.testing.assert_allclose(history["resampling_threshold"], [0.005, 0.005 * 0.875, 0.005 * 0.875 ** 2])
    assert np.isnan(history["masked_change"][0]) and np.all(history["masked_tokens"] > 0)


def test_missing_pieces_are_named(tmp_path, fake_run):
    with pytest.raises(PanelError, match="Select a trained run folder"):
        runs.RunFolder("")
    nowhere = tmp_path / "nowhere"
    assert runs.RunFolder(nowhere).missing_pieces() == [f"the folder {nowhere} does not exist"]
    broken = tmp_path / "broken"
    shutil.copytree(fake_run.root, broken)
    (broken / "vqvae.pt").unlink()
    for folder in broken.glob("iteration_*"):
        (folder / "transformer.pt").unlink()
    run = runs.RunFolder(broken)
    assert run.missing_pieces() == ["vqvae.pt", "a trained Transformer (iteration_*/transformer.pt)"]
    with pytest.raises(PanelError, match="missing pieces: vqvae.pt, a trained Transformer"):
        run.check_complete()
    with pytest.raises(PanelError, match="iteration 7|Iteration 7"):
        fake_run.resolve_iteration(7)


def test_spatial_dims_fall_back_to_config_and_versions_are_checked(tmp_path):
    (tmp_path / "config.yaml").write_text("preset: tiny\ndata:\n  spatial_dims: 2\n  intensity: pet\n")
    assert runs.RunFolder(tmp_path).spatial_dims == 2
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99, "spatial_dims": 3, "images": []}))
    with pytest.raises(PanelError, match="incompatible version"):
        runs.RunFolder(tmp_path).scans()
    (tmp_path / "history.json").write_text("{not json")
    with pytest.raises(PanelError, match="damaged"):
        runs.RunFolder(tmp_path).history()


def test_browser_loads_scan_and_iteration_mask(scene, fake_run):
    volume, segmentation = runs.load_iteration_scan(scene, fake_run, 1, "case000")
    assert volume.GetName() == "case000 (ILTM training scan)"
    assert segmentation.GetName() == "case000 iteration 1 anomaly mask"
    image = sitk.ReadImage(str(fake_run.scan("case000").image))
    expected = volumes.ijk_to_ras_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    np.testing.assert_allclose(volumes.get_ijk_to_ras(volume), expected, atol=1e-5)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(fake_run.mask_path(1, "case000"))))
    labels, ids = segments.segment_labels_on(segmentation, volume)
    assert len(ids) == 1 and (labels > 0).sum() == mask.sum() > 0
    # No helper label map is left behind.
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0

    # Moving the slider replaces the browser's pair of nodes.
    nodes = count_nodes(scene)
    volume2, segmentation2 = runs.load_iteration_scan(scene, fake_run, 2, "case001", previous=(volume, segmentation))
    assert volume.GetScene() is None and segmentation.GetScene() is None
    assert volume2.GetScene() is scene and count_nodes(scene) == nodes


def test_browser_failure_leaves_the_scene_as_it_was(scene, fake_run, tmp_path):
    volume, segmentation = runs.load_iteration_scan(scene, fake_run, 0, "case000")
    nodes = count_nodes(scene)
    broken = tmp_path / "run"
    shutil.copytree(fake_run.root, broken)
    (broken / "iteration_001" / "masks" / "case000_mask.nii.gz").write_bytes(b"garbage" * 10)
    with pytest.raises(PanelError, match="cannot read"):
        runs.load_iteration_scan(scene, runs.RunFolder(broken), 1, "case000", previous=(volume, segmentation))
    assert count_nodes(scene) == nodes and volume.GetScene() is scene
    with pytest.raises(PanelError, match="no mask"):
        runs.load_iteration_scan(scene, fake_run, 5, "case000")
    with pytest.raises(PanelError, match="no training scan"):
        runs.load_iteration_scan(scene, fake_run, 0, "nobody")
    assert count_nodes(scene) == nodes


def test_history_plot_nodes(scene, fake_run):
    plot = runs.history_plot(scene, fake_run)
    table = plot.table
    assert table.GetNumberOfRows() == 3
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [
        "iteration", "masked_tokens", "resampling_threshold", "masked_change_percent"]
    assert float(table.GetCellText(2, 2)) == pytest.approx(0.005 * 0.875 ** 2, rel=1e-5)  # text has 6 digits
    tokens_series = plot.masked_tokens_chart.GetNthPlotSeriesNode(0)
    assert tokens_series.GetTableNode() is table
    assert (tokens_series.GetXColumnName(), tokens_series.GetYColumnName()) == ("iteration", "masked_tokens")
    assert plot.threshold_chart.GetNthPlotSeriesNode(0).GetYColumnName() == "resampling_threshold"
    nodes = count_nodes(scene)
    again = runs.history_plot(scene, fake_run, previous=plot)
    assert count_nodes(scene) == nodes and plot.table.GetScene() is None and again.table.GetScene() is scene
