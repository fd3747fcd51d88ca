"""ILTMAnomaly.py itself, imported with stand-ins for its Qt-side imports: its Logic runs the whole panel
workflow headless on real MRML (fake CLI), and the self-test's bad-input case passes."""

from __future__ import annotations

import math

import pytest

import slicer
from ILTMAnomalyLib import PanelError, volumes, workflow

from mrml_helpers import count_nodes, make_run, phantom_pet, write_cohort
from slicer_app_stubs import import_module_file


@pytest.fixture
def module(monkeypatch, scene):
    return import_module_file(monkeypatch, scene)


def test_parameter_class_defaults(module):
    p = module.ILTMAnomalyParameterNode()
    assert p.iteration == -1 and p.device == "auto" and p.preset == "small"
    assert p.scoreThreshold == pytest.approx(-math.log(0.005))
    assert p.splitComponents is True and p.overlayOpacity == 0.5


def test_zero_means_the_runs_own_value(module):
    p = module.ILTMAnomalyParameterNode()
    settings = module.ILTMAnomalyLogic.detectionSettings(p)
    assert settings == workflow.DetectionSettings(iteration=None, device="auto", density_threshold=0.005)
    p.iteration, p.samples, p.dropoutPasses, p.eps, p.resamplingThreshold, p.device = 2, 12, 2, 0.05, 0.004, "cpu"
    settings = module.ILTMAnomalyLogic.detectionSettings(p)
    assert (settings.iteration, settings.samples, settings.dropout_passes, settings.eps,
            settings.resampling_threshold, settings.device) == (2, 12, 2, 0.05, 0.004, "cpu")
    p.trainingData, p.trainingOutput, p.maxIterations = None, None, -1
    training = module.ILTMAnomalyLogic.trainingSettings(p)
    assert training.max_iterations is None and training.preset == "small"


def test_logic_runs_the_panel_workflow_headless(module, scene, pet_file, tmp_path, fake_cli):
    logic = module.ILTMAnomalyLogic()
    logic.cliCommand = fake_cli
    composite = slicer.vtkMRMLSliceCompositeNode()
    scene.AddNode(composite)
    pet = volumes.read_volume(scene, pet_file, "PET")
    run = make_run(tmp_path / "run")

    score, binary = logic.detect(pet, run, workflow.DetectionSettings(), timeout=120)
    assert score.GetName() == "PET anomaly score" and binary.GetName() == "PET anomaly mask"
    logic.showOverlay(pet, score, binary, 5.0, 0.4)
    assert composite.GetForegroundVolumeID() == score.GetID() and composite.GetLabelVolumeID() == binary.GetID()

    _, lesions = phantom_pet()
    same, count = logic.updateBinaryMap(score, 7.0, binary)
    assert same is binary and count == (lesions == 1).sum()
    segmentation, table = logic.exportSegmentation(binary, pet)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1 and table.GetNumberOfRows() == 1
    logic.updateBinaryMap(score, 6.0, binary)
    segmentation, table = logic.exportSegmentation(binary, pet, splitComponents=True)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert logic.componentStatistics(segmentation, pet, table) is table
    path = logic.saveSegmentation(segmentation, tmp_path / "out" / "anomalies.seg.nrrd")
    assert path.is_file()

    nodes = count_nodes(scene)
    logic.updateBinaryMap(score, 40.0, binary)
    with pytest.raises(PanelError, match="nothing to export"):
        logic.exportSegmentation(binary, pet)
    assert count_nodes(scene) == nodes


def test_logic_trains_and_browses_iterations(module, scene, tmp_path, fake_cli):
    logic = module.ILTMAnomalyLogic()
    logic.cliCommand = fake_cli
    data = write_cohort(tmp_path / "data")
    job = logic.startTraining(workflow.TrainingSettings(data_folder=data, run_folder=tmp_path / "run",
                                                        preset="tiny", max_iterations=1))
    assert job.wait(timeout=120).value == "succeeded", job.error_message
    logic.loadIteration(tmp_path / "run", 0, "case000")
    nodes = count_nodes(scene)
    volume, segmentation = logic.loadIteration(tmp_path / "run", 1, "case001")
    assert count_nodes(scene) == nodes and logic.browserNodes == (volume, segmentation)
    plot = logic.plotHistory(tmp_path / "run")
    nodes = count_nodes(scene)
    assert logic.plotHistory(tmp_path / "run") is not plot and count_nodes(scene) == nodes
    resumed = logic.resumeTraining(tmp_path / "run")
    assert resumed.wait(timeout=120).value == "succeeded", resumed.error_message


def test_self_test_bad_input_case(module):
    test = module.ILTMAnomalyTest()
    test.setUp()
    test.test_ILTMAnomaly_bad_input()


def test_default_segmentation_file_has_a_safe_name(module, scene, tmp_path):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "3: PET WB anomalies")
    path = module.ILTMAnomalyLogic.defaultSegmentationFile(segmentation, tmp_path)
    assert path == tmp_path / "3_ PET WB anomalies.seg.nrrd"
