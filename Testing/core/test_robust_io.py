"""Issue 19 at the library level: checked writes, output-folder checks, ids, undecodable names, run-folder shapes,
and evaluate's pairing, geometry check and JSON. Fast: no trained model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import run_cli
from iltm import io as iltm_io
from iltm.checkpoint import load_checkpoint, save_checkpoint
from iltm.errors import InputError, printable
from iltm.evaluate import geometry_problem
from iltm.io import (atomic_write_text, check_output_file, check_output_folder, image_from_array, list_images,
                     read_image, write_image, write_png)
from iltm.layout import history_problem, id_problem, manifest_problem


def _noise(shape=(64, 64)) -> sitk.Image:
    return image_from_array(np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32))


def _no_free_space(monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(iltm_io.shutil, "disk_usage", lambda path: usage._replace(free=0))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- 1. every write checked --------------------------------------------------------------------------------------

def test_a_short_image_write_that_simpleitk_does_not_report_is_refused(tmp_path, monkeypatch):
    real_write = sitk.WriteImage

    def short_write(img, name, *args, **kwargs):  # what a full disk does to SimpleITK: a cut file, no error
        real_write(img, name, *args, **kwargs)
        with open(name, "r+b") as fh:
            fh.truncate(os.path.getsize(name) // 2)

    monkeypatch.setattr(iltm_io.sitk, "WriteImage", short_write)
    _no_free_space(monkeypatch)
    for name in ("score.nii.gz", "score.nii", "score.nrrd"):
        with pytest.raises(InputError, match="no space left on device") as caught:
            write_image(_noise(), tmp_path / name)
        assert caught.value.where == str(tmp_path / name)
    assert _leftovers(tmp_path) == []


def test_a_failing_os_write_names_the_file_and_the_cause(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(InputError, match="no space left on device") as caught:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert caught.value.where == str(tmp_path / "metrics.json")
    assert _leftovers(tmp_path) == []


def test_png_writes_are_checked(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.image, "imsave", full)
    with pytest.raises(InputError, match="no space left on device"):
        write_png(np.zeros((8, 8)), tmp_path / "a.png")
    monkeypatch.undo()
    real = matplotlib.image.imsave

    def cut(fname, *args, **kwargs):  # a writer that stops early without a word
        real(fname, *args, **kwargs)
        with open(fname, "r+b") as fh:
            fh.truncate(40)

    monkeypatch.setattr(matplotlib.image, "imsave", cut)
    with pytest.raises(InputError, match="incomplete"):
        write_png(np.zeros((8, 8)), tmp_path / "b.png")
    assert _leftovers(tmp_path) == []


def test_checkpoint_writes_are_checked(tmp_path, monkeypatch):
    real = torch.save

    def cut(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 200)

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(InputError, match="incomplete|damaged"):
        save_checkpoint(tmp_path / "model.pt", "iltm-test", 1, {"weights": torch.zeros(1000)})

    def fails(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", fails)
    _no_free_space(monkeypatch)
    with pytest.raises(InputError, match="no space left on device"):
        save_checkpoint(tmp_path / "model.pt", "iltm-test", 1, {"weights": torch.zeros(10)})
    assert _leftovers(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                 capture_output=True, timeout=30).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("mounting a tmpfs is not permitted here (the patched-writer tests cover the same path)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


def test_a_real_full_disk_is_refused_with_nothing_under_the_final_name(small_tmpfs):
    big = _noise((1024, 1024))  # 4 MB of noise does not compress into 1 MB
    with pytest.raises(InputError, match="no space left on device"):
        write_image(big, small_tmpfs / "score.nii.gz")
    with pytest.raises(InputError, match="no space left on device"):
        atomic_write_text(small_tmpfs / "big.json", "x" * (2 << 20))
    with pytest.raises(InputError, match="no space left on device"):
        save_checkpoint(small_tmpfs / "model.pt", "iltm-test", 1, {"w": torch.rand(1 << 20)})
    assert _leftovers(small_tmpfs) == []
    write_image(_noise((16, 16)), small_tmpfs / "small.nii.gz")  # the check does not refuse what fits
    assert _leftovers(small_tmpfs) == ["small.nii.gz"]


def test_output_targets_are_checked_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_output_folder(taken)
    with pytest.raises(InputError, match="not a folder"):
        check_output_folder(taken / "below")
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path)
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if not ok:
        pytest.skip("bind mounts are not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("read-only remounts are not permitted here")
        with pytest.raises(InputError, match="read-only file system"):
            check_output_folder(folder / "out")
        with pytest.raises(InputError, match="read-only file system"):
            check_output_file(folder / "metrics.json")
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


# -- 2. ids ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../escape", "/abs/olute", "a/b", "a\\b", "..", ".", "", "a\tb", "a\nb",
                                 os.fsdecode(b"\xff")])
def test_ids_that_are_not_one_file_name_are_refused(bad):
    assert id_problem(bad) is not None


@pytest.mark.parametrize("good", ["case_001", "a[1]", "patient 7", "Ünïcode", "a.b"])
def test_ordinary_ids_pass(good):
    assert id_problem(good) is None


def test_a_csv_id_that_escapes_is_refused_naming_the_row(tmp_path):
    image = tmp_path / "scan.nii.gz"
    write_image(_noise(), image)
    for bad in ("../../escape", str(tmp_path / "elsewhere"), "a\x07b"):
        listing = tmp_path / "list.csv"
        listing.write_text(f"image,id\nscan.nii.gz,ok\nscan.nii.gz,{bad}\n", encoding="utf-8")
        with pytest.raises(InputError, match="line 3") as caught:
            list_images(listing)
        assert caught.value.where == str(listing)


def test_a_file_name_with_a_control_character_is_refused_in_one_printable_line(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_image(_noise(), folder / "a\nb.nii.gz")
    with pytest.raises(InputError) as caught:
        list_images(folder)
    line = printable(str(caught.value))
    assert "\n" not in line and "a\\nb" in line


# -- 3. names that are not UTF-8 ----------------------------------------------------------------------------------

def test_undecodable_names_are_refused_or_skipped_never_an_abort(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_image(_noise(), folder / "good.nii.gz")
    os.mkdir(os.fsdecode(bytes(folder) + b"/\xff"))  # an empty sub-folder: listed past, not opened
    assert [r.id for r in list_images(folder)] == ["good"]
    bad = Path(os.fsdecode(bytes(folder) + b"/\xfe.nii.gz"))
    shutil.copy(folder / "good.nii.gz", bad)
    with pytest.raises(InputError, match="UTF-8"):
        read_image(bad)
    with pytest.raises(InputError, match="UTF-8"):
        write_image(_noise(), Path(os.fsdecode(bytes(folder) + b"/\xfd.nii.gz")))
    with pytest.raises(InputError) as caught:
        list_images(folder)
    assert "\\xfe" in printable(str(caught.value))


# -- 5. evaluate -------------------------------------------------------------------------------------------------

def _pair(tmp_path, scan_id: str, label_id: str | None = None, label=None, geometry=None) -> tuple[Path, Path]:
    scores, labels = tmp_path / "scores", tmp_path / "labels"
    scores.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    truth = np.zeros((32, 32), np.float32) if label is None else label
    score = image_from_array(rng.normal(size=(32, 32)).astype(np.float32) + 3 * truth)
    write_image(score, scores / f"{scan_id}_score.nii.gz")
    lab = image_from_array(truth)
    for setter, value in (geometry or {}).items():
        getattr(lab, setter)(value)
    write_image(lab, labels / f"{label_id or scan_id}.nii.gz")
    return scores, labels


def _lesion() -> np.ndarray:
    truth = np.zeros((32, 32), np.float32)
    truth[10:16, 10:16] = 1
    return truth


def test_evaluate_pairs_by_exact_id_not_by_pattern(tmp_path, capsys):
    scores, labels = _pair(tmp_path, "a[1]", label_id="a1", label=_lesion())
    assert run_cli("evaluate", "--scores", scores, "--labels", labels) == 2
    assert "no label file for 'a[1]'" in capsys.readouterr().err
    assert not (scores / "metrics.json").exists()
    write_image(read_image(labels / "a1.nii.gz"), labels / "a[1].nii.gz")
    assert run_cli("evaluate", "--scores", scores, "--labels", labels) == 0
    assert json.loads((scores / "metrics.json").read_text())["ids"] == ["a[1]"]


@pytest.mark.parametrize("setter,value,what", [("SetSpacing", (1.0, 2.0), "spacing"),
                                               ("SetOrigin", (0.0, 5.0), "origin"),
                                               ("SetDirection", (0.0, 1.0, 1.0, 0.0), "direction")])
def test_evaluate_refuses_a_label_on_another_grid(tmp_path, capsys, setter, value, what):
    scores, labels = _pair(tmp_path, "s", label=_lesion(), geometry={setter: value})
    assert run_cli("evaluate", "--scores", scores, "--labels", labels) == 2
    err = capsys.readouterr().err
    assert f"label {what}" in err and "s.nii.gz" in err
    assert not (scores / "metrics.json").exists()


def test_geometry_within_the_stated_tolerance_is_accepted():
    a = image_from_array(np.zeros((8, 8), np.float32))
    b = image_from_array(np.zeros((8, 8), np.float32))
    a.SetSpacing((2.0, 2.0))
    a.SetOrigin((-100.0, 40.0))
    b.SetSpacing((2.0 * (1 + 1e-6), 2.0))
    b.SetOrigin((-100.0 + 1e-5, 40.0))
    assert geometry_problem(a, b) is None
    b.SetOrigin((-100.0 + 0.5, 40.0))
    assert "origin" in geometry_problem(a, b)


def test_evaluate_writes_valid_json_with_null_and_the_reason_where_a_metric_is_undefined(tmp_path, capsys):
    scores, labels = _pair(tmp_path, "healthy")
    assert run_cli("evaluate", "--scores", scores, "--labels", labels) == 0
    text = (scores / "metrics.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert summary["auroc"] is None and summary["best_dice"] is None
    assert "no lesion voxels" in summary["undefined"]["auroc"]
    assert summary["per_image"][0]["auroc"] is None
    out = capsys.readouterr().out
    assert "n/a" in out and "auroc" in out and "no lesion voxels" in out


# -- 6. run-folder shapes ------------------------------------------------------------------------------------------

def test_history_and_manifest_shapes_are_checked():
    good = {"version": 1, "vqvae": None, "finished": False, "stop_reason": None,
            "iterations": [{"iteration": 0, "masked_tokens": 3, "masked_change": None}]}
    assert history_problem(good) is None
    for bad in ({"iterations": "x"}, {"iterations": [{"masked_tokens": 1}]}, {"iterations": [{"iteration": "0"}]},
                {"iterations": [{"iteration": 0, "masked_fraction": "many"}]}, {"finished": "yes"},
                {"iterations": [{"iteration": 0}, {"iteration": 0}]}):
        assert history_problem({**good, **bad}) is not None, bad
    manifest = {"images": [{"id": "a", "image": "/x/a.nii.gz"}], "spatial_dims": 2}
    assert manifest_problem(manifest) is None
    for bad in ({"images": "all"}, {"images": [{"id": "../a", "image": "/x"}]}, {"images": [{"id": "a"}]},
                {"images": [{"id": "a", "image": "/x"}, {"id": "a", "image": "/y"}]}, {"spatial_dims": 4},
                {"spatial_size": ["64"]}):
        assert manifest_problem({**manifest, **bad}) is not None, bad


def test_a_checkpoint_of_the_right_format_and_the_wrong_shape_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", "iltm-test", 1, {"weights": torch.zeros(2)})
    with pytest.raises(InputError, match="lacks state_dict"):
        load_checkpoint(tmp_path / "c.pt", "iltm-test", 1, required=("weights", "state_dict"))
