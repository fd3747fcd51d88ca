"""Detection and training as the panel runs them, against the fake CLI: checks, results, failures, cancel."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from ILTMAnomalyLib import PanelError, jobs, overlay, volumes, workflow

from mrml_helpers import count_nodes, make_run, phantom_pet


def test_inputs_are_checked_before_anything_starts(scene, pet_node, tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(PanelError, match="Select a PET volume"):
        workflow.check_detection_inputs(None, run)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    volumes.update_volume_from_array(label, np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(PanelError, match="label map"):
        workflow.check_detection_inputs(label, run)
    with pytest.raises(PanelError, match="Select a trained run folder"):
        workflow.check_detection_inputs(pet_node, "")
    with pytest.raises(PanelError, match="missing pieces"):
        workflow.check_detection_inputs(pet_node, tmp_path / "empty")
    (run / "vqvae.pt").unlink()
    with pytest.raises(PanelError, match="missing pieces: vqvae.pt"):
        workflow.check_detection_inputs(pet_node, run)
    run2d = make_run(tmp_path / "run2d", dims=2)
    with pytest.raises(PanelError, match="trained on 2D images but 'PET' is 3D"):
        workflow.check_detection_inputs(pet_node, run2d)
    run3d = make_run(tmp_path / "run3d")
    assert workflow.check_detection_inputs(pet_node, run3d)[1] == 1
    with pytest.raises(PanelError, match="Iteration 4"):
        workflow.check_detection_inputs(pet_node, run3d, iteration=4)


def test_detection_arguments_pass_only_what_the_user_set(tmp_path):
    run = workflow.RunFolder(make_run(tmp_path / "run"))
    args = workflow.detection_args(run, "in.nii.gz", "out", workflow.DetectionSettings())
    assert args == ["detect", "--run", str(run.root), "--input", "in.nii.gz", "--out", "out", "--device", "auto",
                    "--density-threshold", "0.005"]
    settings = workflow.DetectionSettings(iteration=1, device="cpu", resampling_threshold=0.004, samples=12,
                                          dropout_passes=2, eps=0.05, density_threshold=0.01, seed=3)
    args = workflow.detection_args(run, "in.nii.gz", "out", settings)
    assert args[args.index("--iteration") + 1] == "1" and args[args.index("--samples") + 1] == "12"
    assert args[args.index("--resampling-threshold") + 1] == "0.004" and args[args.index("--eps") + 1] == "0.05"
    with pytest.raises(PanelError, match="Unknown device"):
        workflow.detection_args(run, "in", "out", workflow.DetectionSettings(device="tpu"))


def test_detection_loads_score_and_mask_on_the_pet_grid(scene, pet_node, tmp_path, fake_cli):
    run = make_run(tmp_path / "run")
    detection = workflow.start_detection(pet_node, run, workflow.DetectionSettings(density_threshold=0.005),
                                         command=fake_cli)
    assert detection.job.wait(timeout=120) is jobs.JobState.SUCCEEDED, detection.job.error_message
    assert detection.job.outputs["score"][0].endswith("input_score.nii.gz")
    score, mask = workflow.finish_detection(scene, detection)
    assert not detection.work_dir.exists()
    assert score.GetName() == "PET anomaly score" and mask.GetName() == "PET anomaly mask"
    assert mask.IsA("vtkMRMLLabelMapVolumeNode") and score.GetScene() is scene
    np.testing.assert_allclose(volumes.get_ijk_to_ras(score), volumes.get_ijk_to_ras(pet_node), atol=1e-12)
    pet, lesions = phantom_pet()
    np.testing.assert_allclose(volumes.array_from_volume(score), pet)       # the fake scores the intensity
    np.testing.assert_array_equal(volumes.array_from_volume(mask), (pet > overlay.score_threshold(0.005)))
    assert volumes.array_from_volume(mask).sum() == (lesions > 0).sum()


def test_failed_detection_shows_the_cli_line_and_adds_nothing(scene, pet_node, tmp_path, fake_cli, monkeypatch):
    run = make_run(tmp_path / "run")
    nodes = count_nodes(scene)
    monkeypatch.setenv("FAKE_ILTM_FAIL", "1")
    detection = workflow.start_detection(pet_node, run, command=fake_cli)
    detection.job.wait(timeout=120)
    with pytest.raises(PanelError) as error:
        workflow.finish_detection(scene, detection)
    assert str(error.value) == ("Detection failed: "
                                f"{detection.work_dir / 'input.nii'}: image is too small for the VQ-VAE "
                                "(needs at least 8 voxels per axis)")
    assert count_nodes(scene) == nodes and not detection.work_dir.exists()


def test_cancelled_detection_adds_nothing(scene, pet_node, tmp_path, fake_cli, monkeypatch):
    run = make_run(tmp_path / "run")
    nodes = count_nodes(scene)
    monkeypatch.setenv("FAKE_ILTM_SLEEP", "20")
    detection = workflow.start_detection(pet_node, run, command=fake_cli)
    time.sleep(0.5)
    detection.job.cancel(grace_seconds=2, wait=True)
    with pytest.raises(PanelError, match="cancelled"):
        workflow.finish_detection(scene, detection)
    assert count_nodes(scene) == nodes and not detection.work_dir.exists()


def test_results_off_the_pet_grid_are_refused(scene, pet_node, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("score", "mask"):
        sitk.WriteImage(sitk.Image(5, 5, 5, sitk.sitkFloat32), str(out / f"input_{kind}.nii.gz"))
    nodes = count_nodes(scene)
    with pytest.raises(PanelError, match="does not lie on the grid"):
        workflow.load_detection_results(scene, pet_node, out)
    (out / "input_mask.nii.gz").unlink()
    with pytest.raises(PanelError, match="did not write input_mask.nii.gz"):
        workflow.load_detection_results(scene, pet_node, out)
    assert count_nodes(scene) == nodes


def test_training_arguments_and_folder_checks(tmp_path, pet_file):
    settings = workflow.TrainingSettings(data_folder=pet_file.parent, run_folder=tmp_path / "new_run",
                                         preset="tiny", max_iterations=3, seed=1)
    assert workflow.training_args(settings) == [
        "train", "--data", str(pet_file.parent), "--out", str(tmp_path / "new_run"), "--preset", "tiny",
        "--max-iterations", "3", "--seed", "1"]
    with pytest.raises(PanelError, match="folder of training scans"):
        workflow.training_args(workflow.TrainingSettings(run_folder=tmp_path / "r"))
    with pytest.raises(PanelError, match="output folder"):
        workflow.training_args(workflow.TrainingSettings(data_folder=tmp_path))
    with pytest.raises(PanelError, match="does not exist"):
        workflow.training_args(workflow.TrainingSettings(data_folder=tmp_path / "no", run_folder=tmp_path / "r"))
    existing = make_run(tmp_path / "existing")
    with pytest.raises(PanelError, match="press Resume"):
        workflow.training_args(workflow.TrainingSettings(data_folder=tmp_path, run_folder=existing))
    with pytest.raises(PanelError, match="Unknown preset"):
        workflow.training_args(workflow.TrainingSettings(data_folder=tmp_path, run_folder=tmp_path / "r",
                                                         preset="huge"))
    assert workflow.resume_args(existing) == ["train", "--resume", str(existing)]
    with pytest.raises(PanelError, match="nothing to resume"):
        workflow.resume_args(tmp_path / "r")


def test_training_reports_each_iteration_and_resumes(tmp_path, pet_file, fake_cli):
    run = tmp_path / "run"
    job = workflow.start_training(workflow.TrainingSettings(data_folder=pet_file.parent, run_folder=run,
                                                            preset="tiny", max_iterations=1), command=fake_cli)
    assert job.wait(timeout=120) is jobs.JobState.SUCCEEDED, job.error_message
    assert [e["iteration"] for e in job.iterations] == [0, 1]
    assert workflow.training_progress_text(job).startswith("Iteration 1:")
    resumed = workflow.start_resume(run, command=fake_cli)
    assert resumed.wait(timeout=120) is jobs.JobState.SUCCEEDED, resumed.error_message
    assert workflow.RunFolder(run).trained_iterations() == [0, 1, 2]
