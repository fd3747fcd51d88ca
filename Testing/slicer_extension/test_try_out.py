"""The one-click try-out and model bundles in the panel: the Sample Data source, the shipped demo model, a bundle in
the model field, and the self-test's sample -> Detect -> overlay -> segments path with the real core."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
import urllib.request
import zipfile
from pathlib import Path

import pytest

import slicer
from iltm.layout import BUNDLE_MEMBERS, BUNDLE_METADATA
from ILTMAnomalyLib import PanelError, jobs, runs, sampledata, volumes, workflow

from mrml_helpers import make_run
from slicer_app_stubs import import_module_file


class FakeSampleData:
    """Slicer's SampleData module reduced to what a registered source goes through: the source's URI is fetched
    into a cache folder with urllib (Slicer's ``downloadFile``), its checksum verified, and the file loaded as a
    volume named after the source's node name."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.sources = {}
        fake = self

        class SampleDataLogic:
            @staticmethod
            def registerCustomSampleDataSource(category, sampleName, uris, fileNames, nodeNames, checksums,
                                               **options):
                fake.sources[sampleName] = dict(category=category, uris=uris, fileNames=fileNames,
                                                nodeNames=nodeNames, checksums=checksums, **options)

        self.SampleDataLogic = SampleDataLogic

    def downloadSample(self, name):
        source = self.sources[name]
        self.cache.mkdir(parents=True, exist_ok=True)
        path = self.cache / source["fileNames"]
        urllib.request.urlretrieve(source["uris"], str(path))
        algo, digest = source["checksums"].split(":")
        assert hashlib.new(algo.lower(), path.read_bytes()).hexdigest() == digest, "checksum verification failed"
        return volumes.read_volume(slicer.mrmlScene, path, source["nodeNames"])


@pytest.fixture
def sample_data(monkeypatch, tmp_path):
    fake = FakeSampleData(tmp_path / "cache")
    module = types.ModuleType("SampleData")
    module.SampleDataLogic = fake.SampleDataLogic
    module.downloadSample = fake.downloadSample
    monkeypatch.setitem(sys.modules, "SampleData", module)
    return fake


def test_sample_data_source_is_the_shipped_synthetic_pet(monkeypatch, scene, sample_data):
    module = import_module_file(monkeypatch, scene)
    module.registerSampleData()
    source = sample_data.sources[sampledata.SAMPLE_NAME]
    assert source["category"] == "ILTM Anomaly" and source["uris"].startswith("file:")
    assert Path(urllib.request.url2pathname(source["uris"][len("file:"):])) == sampledata.SAMPLE_PET
    assert Path(source["thumbnailFileName"]).is_file()
    pet = module.ILTMAnomalyLogic.loadSamplePET()
    assert pet.GetName() == sampledata.SAMPLE_NAME and scene.GetNodeByID(pet.GetID()) is pet
    array = volumes.array_from_volume(pet)
    # A PET-like phantom in SUV: body around 1, hot organs and lesions well above.
    assert array.ndim == 3 and array.max() > 5 and 0.5 < float((array[array > 0.3]).mean()) < 5
    # On the demo model's own grid, so detection needs no tiling.
    metadata = runs.open_model(workflow.default_model()).metadata
    assert list(pet.GetImageData().GetDimensions()) == metadata["model_grid"]


def test_a_changed_sample_file_fails_its_checksum(monkeypatch, scene, sample_data, tmp_path):
    copy = tmp_path / "changed.nii.gz"
    shutil.copyfile(sampledata.SAMPLE_PET, copy)
    monkeypatch.setattr(sampledata, "SAMPLE_PET", copy)
    sampledata.register(sample_data.SampleDataLogic)
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(AssertionError, match="checksum"):
        sample_data.downloadSample(sampledata.SAMPLE_NAME)


def test_demo_model_is_small_and_names_no_training_scan():
    path = workflow.default_model()
    assert path is not None and path.name == "iltm-demo-synthetic-pet-tiny.zip"
    assert path.stat().st_size < 5 * 2 ** 20
    bundle = runs.open_model(path)
    assert isinstance(bundle, runs.ModelBundle)
    metadata = bundle.metadata
    assert metadata["modality"] == "PT" and metadata["units"] == "SUV" and metadata["spatial_dims"] == 3
    assert metadata["training"]["preset"] == "tiny" and metadata["training"]["scans"] == 12
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(BUNDLE_MEMBERS)
        for name in archive.namelist():
            data = archive.read(name)
            # The cohort's ids (case000...) and the folder it was trained in (make_demo_model.py's work folder).
            for needle in (b"case0", b"/tmp/", b"iltm-demo-model-", b"manifest", b"images/"):
                assert needle not in data, (needle, name)
    assert "3D model" in bundle.description() and "12 scans" in bundle.description()


def _bundle(folder: Path, dims=3, iteration=2) -> Path:
    """A bundle whose zip and metadata are right (weights are placeholders: the fake CLI does not read them)."""
    path = folder / "model.zip"
    metadata = {"format": "iltm-model-bundle", "bundle_version": 1, "spatial_dims": dims, "iteration": iteration,
                "training": {"scans": 5, "date": "2025-01-01"}, "units": "SUV"}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(BUNDLE_METADATA, json.dumps(metadata))
        for name in BUNDLE_MEMBERS[1:]:
            archive.writestr(name, "placeholder")
    return path


def test_panel_takes_a_bundle_in_the_model_field(scene, pet_node, tmp_path, fake_cli):
    path = _bundle(tmp_path)
    model, iteration = workflow.check_detection_inputs(pet_node, path)
    assert isinstance(model, runs.ModelBundle) and iteration == 2
    assert workflow.check_detection_inputs(pet_node, path, iteration=-1)[1] == 2
    with pytest.raises(PanelError, match="holds ILTM iteration 2 only"):
        workflow.check_detection_inputs(pet_node, path, iteration=1)
    (tmp_path / "2d").mkdir()
    with pytest.raises(PanelError, match="trained on 2D images"):
        workflow.check_detection_inputs(pet_node, _bundle(tmp_path / "2d", dims=2))
    detection = workflow.start_detection(pet_node, path, workflow.DetectionSettings(), command=fake_cli)
    assert detection.job.argv[detection.job.argv.index("--run") + 1] == str(path)
    assert detection.job.wait(timeout=120) is jobs.JobState.SUCCEEDED, detection.job.error_message
    score, mask = workflow.finish_detection(scene, detection)
    assert volumes.same_geometry(score, pet_node, tolerance=1e-6)


def test_a_run_folders_config_yaml_stands_for_the_run(tmp_path):
    run = make_run(tmp_path / "run")
    assert runs.open_model(run / "config.yaml").root == run
    assert isinstance(runs.open_model(run), runs.RunFolder)


def test_a_damaged_bundle_is_refused_before_anything_starts(scene, pet_node, tmp_path):
    good = _bundle(tmp_path)
    cases = {"truncated.zip": good.read_bytes()[:40], "text.zip": b"not a zip"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "partial.zip", "w") as archive:
        archive.writestr(BUNDLE_METADATA, zipfile.ZipFile(good).read(BUNDLE_METADATA))
    before = scene.GetNumberOfNodes()
    for name, expected in (("truncated.zip", "not a readable zip"), ("text.zip", "not a readable zip"),
                           ("partial.zip", "missing config.yaml, vqvae.pt, transformer.pt")):
        with pytest.raises(PanelError, match=expected) as error:
            workflow.start_detection(pet_node, tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)
    assert scene.GetNumberOfNodes() == before


def test_logic_defaults_to_the_demo_model(monkeypatch, scene, pet_node, fake_cli):
    module = import_module_file(monkeypatch, scene)
    logic = module.ILTMAnomalyLogic()
    logic.cliCommand = fake_cli
    assert logic.defaultModel() == workflow.DEMO_MODEL
    detection = logic.startDetection(pet_node)
    assert detection.job.argv[detection.job.argv.index("--run") + 1] == str(workflow.DEMO_MODEL)
    detection.job.wait(timeout=120)
    detection.cleanup()
    with pytest.raises(PanelError, match="Select a trained run folder"):
        logic.startDetection(pet_node, "")


@pytest.mark.slow
def test_module_self_test_sample_data_with_demo_model(monkeypatch, scene, sample_data):
    """The self-test's try-out path with the real core: sample PET -> demo model -> overlay -> segments."""
    module = import_module_file(monkeypatch, scene)
    module.registerSampleData()
    test = module.ILTMAnomalyTest()
    test.setUp()
    test.test_ILTMAnomaly_sample_data_with_demo_model()
    segmentations = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert segmentations.GetNumberOfItems() == 1
