"""The panel going away (Slicer closes, the module is reloaded): detection stops and its scratch folder goes; a
running training is stopped only when the user says so. The fake CLI stands in for ``iltm``."""

from __future__ import annotations

import time

import slicer
from ILTMAnomalyLib import jobs, workflow

from mrml_helpers import make_run, write_cohort
from slicer_app_stubs import FakeUi, FakeWidget, import_module_file


def _running(scene, pet_node, tmp_path, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_ILTM_SLEEP", "20")
    detection = workflow.start_detection(pet_node, make_run(tmp_path / "run"), command=fake_cli)
    training = workflow.start_training(workflow.TrainingSettings(
        data_folder=write_cohort(tmp_path / "data"), run_folder=tmp_path / "new", preset="tiny"), command=fake_cli)
    time.sleep(0.3)
    assert detection.work_dir.is_dir() and detection.job.state is training.state is jobs.JobState.RUNNING
    return detection, training


def test_shut_down_cancels_detection_removes_its_folder_and_asks_about_training(
        scene, pet_node, tmp_path, fake_cli, monkeypatch):
    detection, training = _running(scene, pet_node, tmp_path, fake_cli, monkeypatch)
    asked = []
    workflow.shut_down(detection, training, stop_training=lambda: asked.append(True) or False)
    assert detection.job.state is jobs.JobState.CANCELLED and not detection.work_dir.exists()
    assert asked == [True]
    training.poll()
    assert training.state is jobs.JobState.RUNNING and jobs.process_alive(training.pid)
    workflow.shut_down(None, training, stop_training=lambda: True)
    assert training.state is jobs.JobState.CANCELLED


def test_widget_cleanup_keeps_a_training_the_user_keeps(scene, pet_node, tmp_path, fake_cli, monkeypatch):
    module = import_module_file(monkeypatch, scene)
    detection, training = _running(scene, pet_node, tmp_path, fake_cli, monkeypatch)
    questions = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **options: questions.append(text) or False,
                        raising=False)
    widget = module.ILTMAnomalyWidget()
    widget.ui = FakeUi(())
    widget._jobTimer = widget._thresholdTimer = FakeWidget()
    widget._detection, widget._trainingJob = detection, training
    try:
        widget.cleanup()
        assert not detection.work_dir.exists(), "the detection scratch folder (a copy of the PET) was left behind"
        assert len(questions) == 1 and "training is still running" in questions[0]
        training.poll()
        assert training.state is jobs.JobState.RUNNING, "cleanup stopped the training without asking"
    finally:
        training.cancel(wait=True)
