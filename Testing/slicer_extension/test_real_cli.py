"""The panel's glue against the real ``iltm`` core, run as the panel runs it: ``python -m iltm`` in a child
process, with the bundled core put on its PYTHONPATH by ILTMAnomalyLib.jobs.

One tiny run (3 small scans, 2 epochs per stage, one ILTM iteration) is trained once for the module; model
quality is not the point here, the contract between the panel and the core is: JSON-lines progress, the run
folder's layout, result files on the input's geometry, the one-line errors, and Cancel.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from ILTMAnomalyLib import PanelError, jobs, overlay, runs, segments, volumes, workflow

from mrml_helpers import count_nodes

pytestmark = pytest.mark.slow

QUICK = ["--set", "vqvae.epochs=2", "--set", "transformer.epochs=2", "--set", "detection.samples=2",
         "--set", "detection.dropout_passes=1", "--set", "data.augment=false"]


def run_cli(args, timeout=600, **options) -> jobs.CliJob:
    job = jobs.CliJob(args, **options).start()
    state = job.wait(timeout=timeout)
    if state is jobs.JobState.RUNNING:
        job.cancel(wait=True)
    return job


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    synth = run_cli(["synth", "--out", str(root / "data"), "--dims", "3", "--n", "3", "--size", "24", "20", "16",
                     "--anomalous-fraction", "1", "--seed", "0"])
    assert synth.state is jobs.JobState.SUCCEEDED, synth.error_message
    events = []
    job = run_cli(workflow.training_args(workflow.TrainingSettings(
        data_folder=root / "data", run_folder=root / "run", preset="tiny", max_iterations=1, device="cpu",
        extra_args=QUICK)), timeout=1200, on_event=events.append)
    assert job.state is jobs.JobState.SUCCEEDED, job.error_message
    job.seen = events
    return root, job


def test_training_progress_is_parsed(real_run):
    _, job = real_run
    kinds = [e["event"] for e in job.seen]
    assert kinds[0] == "start" and "done" in kinds and kinds[-1] == "exit"
    fractions = [e["fraction"] for e in job.seen if e["event"] == "progress" and e.get("fraction") is not None]
    assert len(fractions) > 3 and fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert {e["stage"] for e in job.seen if e["event"] == "progress"}
    assert [e["iteration"] for e in job.iterations] == [0, 1]
    assert all(isinstance(e["masked_tokens"], int) for e in job.iterations)
    t0 = job.iterations[0]["resampling_threshold"]
    assert job.iterations[0]["masked_change"] is None and job.iterations[1]["resampling_threshold"] < t0
    assert job.fraction == 1.0 and job.returncode == 0 and job.error_message is None


def test_browser_data_from_a_real_run(real_run, scene):
    root, _ = real_run
    run = runs.RunFolder(root / "run")
    assert run.missing_pieces() == []
    # tiny fits the full-cohort Transformer of the iteration detection uses only (the last, or iteration 0 where
    # the last predicted the never-flagged tokens worse); every iteration has masks
    used = run.history()["detection_iteration"]
    assert run.trained_iterations() == [used] and run.mask_iterations() == [0, 1]
    assert run.resolve_iteration(None) == used
    with pytest.raises(PanelError, match=f"--full-fit {1 - used}"):
        run.resolve_iteration(1 - used)
    assert run.spatial_dims == 3
    scans = run.scans()
    assert len(scans) == 3 and all(scan.image.is_file() for scan in scans)
    history = run.history_arrays()
    np.testing.assert_array_equal(history["iteration"], [0, 1])
    t0 = history["resampling_threshold"][0]
    config = yaml.safe_load((root / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert config["preset"] == "tiny" and t0 == pytest.approx(config["detection"]["resampling_threshold"])
    assert t0 != pytest.approx(0.005)  # the paper's t belongs to the paper preset
    np.testing.assert_allclose(history["resampling_threshold"], [t0, t0 * 0.875])
    for scan in scans:
        volume, segmentation = runs.load_iteration_scan(scene, run, 1, scan.id)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(run.mask_path(1, scan.id))))
        labels, _ = segments.segment_labels_on(segmentation, volume)
        assert (labels > 0).sum() == (mask > 0).sum()
    plot = runs.history_plot(scene, run)
    assert plot.table.GetNumberOfRows() == 2


def test_detection_results_lie_on_the_pet_grid(real_run, scene, tmp_path):
    root, _ = real_run
    scan = sorted((root / "data" / "images").glob("*.nii.gz"))[0]
    # Rotate and stretch the scan's geometry: the results must follow it exactly.
    image = sitk.ReadImage(str(scan))
    image.SetSpacing((3.0, 4.0, 5.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = 0.4
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "rotated.nii.gz"))
    pet = volumes.read_volume(scene, tmp_path / "rotated.nii.gz", "PET")
    settings = workflow.DetectionSettings(device="cpu", samples=2, dropout_passes=1, density_threshold=0.005)
    detection = workflow.start_detection(pet, root / "run", settings)
    assert detection.job.wait(timeout=600) is jobs.JobState.SUCCEEDED, detection.job.error_message
    assert sorted(detection.job.outputs) == ["mask", "score"]
    score, mask = workflow.finish_detection(scene, detection)
    assert volumes.same_geometry(score, pet, tolerance=1e-9) and volumes.same_geometry(mask, pet, tolerance=1e-9)
    score_array = volumes.array_from_volume(score)
    assert score_array.dtype == np.float32 and np.isfinite(score_array).all()
    # The core's mask is the contract's score > -ln(tau).
    expected = score_array > overlay.score_threshold(0.005)
    tolerance = max(3, 0.001 * expected.size)
    assert (volumes.array_from_volume(mask) > 0).sum() == pytest.approx(expected.sum(), abs=tolerance)


def test_core_errors_arrive_as_one_line(real_run, scene, pet_node, tmp_path):
    root, _ = real_run
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "manifest.json"):
        (broken / name).write_bytes((root / "run" / name).read_bytes())
    job = run_cli(["detect", "--run", str(broken), "--input", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path)])
    assert job.state is jobs.JobState.FAILED and job.returncode == 2
    assert job.error_message.startswith(str(broken)) and "vqvae.pt" in job.error_message
    assert "\n" not in job.error_message and "Traceback" not in job.error_message
    # The panel refuses the same folder before starting anything, with the same facts.
    nodes = count_nodes(scene)
    with pytest.raises(PanelError, match="missing pieces: vqvae.pt"):
        workflow.start_detection(pet_node, broken)
    assert count_nodes(scene) == nodes


def test_cancel_stops_real_training(real_run, tmp_path):
    root, _ = real_run
    job = jobs.CliJob(workflow.training_args(workflow.TrainingSettings(
        data_folder=root / "data", run_folder=tmp_path / "run", preset="tiny", device="cpu"))).start()
    deadline = time.monotonic() + 300
    while job.state is jobs.JobState.RUNNING and not any(e["event"] == "progress" for e in job.poll()):
        assert time.monotonic() < deadline, "no progress line within 5 minutes"
        time.sleep(0.1)
    pid = job.pid
    job.cancel(grace_seconds=10, wait=True)
    assert job.state is jobs.JobState.CANCELLED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # Cancelled before its end: not a usable run, and the panel says so instead of trying to detect with it.
    assert runs.RunFolder(tmp_path / "run").missing_pieces()


def test_module_self_test_end_to_end(monkeypatch, scene):
    from slicer_app_stubs import import_module_file

    module = import_module_file(monkeypatch, scene)
    test = module.ILTMAnomalyTest()
    test.setUp()
    test.test_ILTMAnomaly_end_to_end()


def test_2d_scans_go_through_as_one_slice_volumes(tmp_path, scene):
    """Slicer holds a 2D scan as a volume one slice thick; the core must take it for 2D and answer on its grid."""
    synth = run_cli(["synth", "--out", str(tmp_path / "data"), "--dims", "2", "--n", "3", "--size", "32", "32",
                     "--anomalous-fraction", "1", "--seed", "0"])
    assert synth.state is jobs.JobState.SUCCEEDED, synth.error_message
    job = run_cli(workflow.training_args(workflow.TrainingSettings(
        data_folder=tmp_path / "data", run_folder=tmp_path / "run", preset="tiny", max_iterations=0, device="cpu",
        extra_args=QUICK)), timeout=1200)
    assert job.state is jobs.JobState.SUCCEEDED, job.error_message
    assert runs.RunFolder(tmp_path / "run").spatial_dims == 2
    scan = sorted((tmp_path / "data" / "images").glob("*.nii.gz"))[0]
    pet = volumes.read_volume(scene, scan, "PET 2D")
    assert volumes.volume_spatial_dims(pet) == 2
    score, mask = workflow.finish_detection(scene, _detect(pet, tmp_path / "run"))
    assert score.GetImageData().GetDimensions() == pet.GetImageData().GetDimensions()
    assert volumes.same_geometry(score, pet, tolerance=1e-9)
    # ... and a 3D volume is refused for this 2D model before anything starts.
    pet3d = volumes.read_volume(scene, sorted((tmp_path / "data" / "images").glob("*.nii.gz"))[0], "x")
    volumes.update_volume_from_array(pet3d, np.zeros((4, 32, 32), np.float32))
    with pytest.raises(PanelError, match="trained on 2D images"):
        workflow.start_detection(pet3d, tmp_path / "run")


def _detect(pet, run) -> workflow.DetectionRun:
    detection = workflow.start_detection(pet, run, workflow.DetectionSettings(device="cpu", samples=2,
                                                                                dropout_passes=1))
    assert detection.job.wait(timeout=600) is jobs.JobState.SUCCEEDED, detection.job.error_message
    return detection
