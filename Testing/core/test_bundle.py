"""Model bundles (``iltm export``): the same maps as the run folder, nothing of the training scans inside, and a
damaged bundle is one line of error."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import cli_subprocess, run_cli
from iltm.bundle import ModelBundle, export_bundle, open_model
from iltm.detect import Detector
from iltm.errors import InputError
from iltm.layout import BUNDLE_MEMBERS, BUNDLE_METADATA, BUNDLE_VERSION, MASK_SUFFIX, SCORE_SUFFIX, TRANSFORMER
from iltm.run import RunFolder


@pytest.fixture(scope="module")
def bundle(run2d, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "model.zip"
    assert run_cli("export", run2d, "--out", out, "--units", "SUV") == 0
    return out


def _arrays(folder: Path, stem: str):
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}{suffix}")))
            for suffix in (SCORE_SUFFIX, MASK_SUFFIX)]


def test_detect_with_the_bundle_gives_the_run_folders_maps_bit_for_bit(run2d, cohort2d, bundle, tmp_path):
    images = sorted((cohort2d / "images").glob("*.nii.gz"))[:2]
    for image in images:
        for source, out in ((run2d, tmp_path / "from_run"), (bundle, tmp_path / "from_bundle")):
            assert run_cli("detect", "--run", source, "--input", image, "--out", out, "--seed", "3", "--no-png") == 0
    for image in images:
        stem = image.name[: -len(".nii.gz")]
        run_score, run_mask = _arrays(tmp_path / "from_run", stem)
        bundle_score, bundle_mask = _arrays(tmp_path / "from_bundle", stem)
        assert run_score.dtype == np.float32 and np.isfinite(run_score).all() and run_score.std() > 0
        assert np.array_equal(run_score, bundle_score) and np.array_equal(run_mask, bundle_mask)


def test_detector_from_a_bundle_matches_the_run_folder(run2d, bundle):
    from_run = Detector.from_run(str(run2d), device="cpu")
    from_bundle = Detector.from_run(str(bundle), device="cpu")
    assert from_bundle.iteration == from_run.iteration == RunFolder(run2d).trained_iterations()[-1]
    assert from_bundle.cfg == from_run.cfg and from_bundle.latent_shape == from_run.latent_shape
    for a, b in ((from_run.vqvae, from_bundle.vqvae), (from_run.transformer, from_bundle.transformer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    image = torch.rand(1, *from_run.cfg.data.spatial_size[::-1])
    maps = [d.detect_array(image, generator=torch.Generator().manual_seed(5)).log_density
            for d in (from_run, from_bundle)]
    assert torch.equal(maps[0], maps[1])


def test_bundle_holds_nothing_that_names_a_training_scan(run2d, cohort2d, bundle):
    manifest_bytes = (run2d / "manifest.json").read_bytes()
    entries = json.loads(manifest_bytes)["images"]
    needles = {str(cohort2d), str(cohort2d.resolve()), str(run2d), str(run2d.resolve())}
    for entry in entries:
        path = Path(entry["image"])
        needles |= {entry["id"], entry["image"], path.name, str(path.parent)}
    # The run folder itself does hold them (manifest.json: resume needs the paths), so the search below can find them.
    assert all(entry["id"].encode() in manifest_bytes and entry["image"].encode() in manifest_bytes for entry in entries)
    raw = bundle.read_bytes()
    with zipfile.ZipFile(bundle) as archive:
        assert sorted(archive.namelist()) == sorted(BUNDLE_MEMBERS)
        members = {name: archive.read(name) for name in archive.namelist()}
    for needle in sorted(needles):
        for blob_name, blob in [("the zip file", raw), *members.items()]:
            for encoding in ("utf-8", "utf-16-le"):
                assert needle.encode(encoding) not in blob, f"{needle!r} found in {blob_name}"
    # The checkpoints hold weights, config and shapes: no training losses, masks, tokens or ids.
    payload = torch.load(io.BytesIO(members["vqvae.pt"]), weights_only=True)
    assert set(payload) == {"format", "version", "config", "spatial_dims", "state_dict", "latent_shape"}
    payload = torch.load(io.BytesIO(members[TRANSFORMER]), weights_only=True)
    assert payload["extra"] == {"iteration": json.loads(members[BUNDLE_METADATA])["iteration"]}


def test_bundle_metadata_describes_the_model(run2d, bundle):
    metadata = json.loads(zipfile.ZipFile(bundle).read(BUNDLE_METADATA))
    history = json.loads((run2d / "history.json").read_text(encoding="utf-8"))
    assert metadata["bundle_version"] == BUNDLE_VERSION and metadata["packages"]["iltm"]
    assert metadata["packages"]["torch"] == torch.__version__
    assert metadata["modality"] == "PT" and metadata["units"] == "SUV"
    assert metadata["intensity_normalisation"]["intensity"] == "pet"
    assert metadata["spatial_dims"] == 2 and len(metadata["model_grid"]) == 2 and len(metadata["latent_grid"]) == 2
    assert metadata["spacing_mm"] == [2.0, 2.0]  # the synthetic 2D cohort's spacing
    assert metadata["iteration"] == history["iterations"][-1]["iteration"]
    assert metadata["training"]["scans"] == 8 and metadata["training"]["iterations"] == len(history["iterations"])
    assert len(metadata["training"]["date"]) == 10


def test_export_of_an_earlier_iteration_and_iteration_checks(run2d, tmp_path):
    out = tmp_path / "it0.zip"
    export_bundle(run2d, out, iteration=0)
    model = open_model(out)
    assert isinstance(model, ModelBundle) and model.check_for_detection() == 0
    with pytest.raises(InputError, match="holds iteration 0 only"):
        model.check_for_detection(1)
    assert isinstance(open_model(run2d), RunFolder)


def test_export_bad_input_writes_nothing(run2d, tmp_path):
    for args, expected in ((["--out", tmp_path / "m.zip", "--iteration", "7"], "iteration 7 has no full-cohort Transformer"),
                           (["--out", tmp_path / "m.tar"], "must end in .zip")):
        result = cli_subprocess("export", run2d, *args, "--progress", "none")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr
    result = cli_subprocess("export", tmp_path / "nothing", "--out", tmp_path / "m.zip", "--progress", "none")
    assert result.returncode == 2 and "run folder does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _damaged_bundles(bundle: Path, folder: Path) -> dict:
    """name -> (path, what the error line must say)."""
    raw = bundle.read_bytes()
    cases = {}
    (folder / "truncated.zip").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (folder / "truncated.zip", "not a readable zip archive")
    (folder / "text.zip").write_text("hello", encoding="utf-8")
    cases["not a zip"] = (folder / "text.zip", "not a readable zip archive")
    with zipfile.ZipFile(bundle) as src:
        members = {name: src.read(name) for name in src.namelist()}

    def rewrite(name, changed, drop=()):
        with zipfile.ZipFile(folder / name, "w") as out:
            for member, data in members.items():
                if member not in drop:
                    out.writestr(member, changed.get(member, data))
        return folder / name

    cases["missing member"] = (rewrite("missing.zip", {}, drop=(TRANSFORMER,)), "missing transformer.pt")
    newer = json.dumps({**json.loads(members[BUNDLE_METADATA]), "bundle_version": BUNDLE_VERSION + 1})
    cases["newer version"] = (rewrite("newer.zip", {BUNDLE_METADATA: newer}), "incompatible version")
    cases["bad weights"] = (rewrite("weights.zip", {TRANSFORMER: members[TRANSFORMER][:100]}),
                            "not a readable Transformer checkpoint")
    # A flipped byte inside a stored (uncompressed) member: the zip's CRC catches it.
    stored = rewrite("stored.zip", {})
    data = bytearray(stored.read_bytes())
    at = data.find(members["vqvae.pt"][200:232])
    assert at > 0
    data[at] ^= 0xFF
    (folder / "flipped.zip").write_bytes(bytes(data))
    cases["flipped byte"] = (folder / "flipped.zip", "fails its checksum")
    return cases


def test_damaged_bundle_is_one_line_and_writes_nothing(cohort2d, bundle, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    cases = _damaged_bundles(bundle, tmp_path)
    for name, (path, expected) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        result = cli_subprocess("detect", "--run", path, "--input", image, "--out", out, "--progress", "none")
        assert result.returncode == 2, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"iltm: error: {path}") and expected in lines[0], (name, lines)
        assert not out.exists(), name


def test_detect_rejects_another_iteration_than_the_bundles(cohort2d, bundle, tmp_path):
    image = sorted((cohort2d / "images").glob("*.nii.gz"))[0]
    metadata = json.loads(zipfile.ZipFile(bundle).read(BUNDLE_METADATA))
    other = metadata["iteration"] + 1
    result = cli_subprocess("detect", "--run", bundle, "--input", image, "--out", tmp_path / "out",
                            "--iteration", str(other), "--progress", "none")
    assert result.returncode == 2 and f"holds iteration {metadata['iteration']} only" in result.stderr
