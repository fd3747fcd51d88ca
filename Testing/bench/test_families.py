"""Cohorts from real images that packages ship (iltm_bench.families): splits apart, fractions exact, labels where the
defects are, the same cohort from the same seed, and the layout the core and the sweep read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("skimage")
pytest.importorskip("nilearn")

from iltm.errors import InputError  # noqa: E402
from test_sweep import parse  # noqa: E402  (the benchmark's own argument parser)
from iltm.io import list_images  # noqa: E402
from iltm.progress import Reporter  # noqa: E402
from iltm_bench import families  # noqa: E402
from iltm_bench.sweep import SWEEP_CSV, command_line, settings_from_args  # noqa: E402


def arrays(folder: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    images = {s["id"]: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / s["image"]))) for s in m["subjects"]}
    labels = {s["id"]: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / s["label"]))) for s in m["subjects"]}
    return m, images, labels


def cohort(folder: Path, *args) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    families.make_family_cohort(folder, *args)
    return arrays(folder)


@pytest.mark.parametrize("family", families.FAMILIES)
@pytest.mark.parametrize("fraction, n, expected", [(0.0, 6, 0), (0.5, 6, 3), (1.0, 5, 5)])
def test_fractions_hold_and_only_anomalous_subjects_have_labels(tmp_path, family, fraction, n, expected):
    m, images, labels = cohort(tmp_path / "c", family, n, fraction, 0, "val", 32)
    assert m["n_anomalous"] == expected == sum(s["anomalous"] for s in m["subjects"])
    for s in m["subjects"]:
        assert images[s["id"]].shape == labels[s["id"]].shape == (32, 32)
        assert bool(labels[s["id"]].any()) == s["anomalous"]
        assert int(labels[s["id"]].sum()) == s["labelled_pixels"]


def test_texture_labels_are_where_the_defects_changed_the_image(tmp_path):
    rng_seed = 4
    for i in range(6):
        rng = np.random.default_rng([rng_seed, i])
        clean, _, _ = families.texture_subject(np.random.default_rng([rng_seed, i]), "val", 64, anomalous=False)
        defective, label, desc = families.texture_subject(rng, "val", 64, anomalous=True)
        assert desc["defects"] and label.any()
        # Same draws up to the defects: the crop and contrast are identical, so outside the label nothing changed
        # beyond the defects' soft rims, and inside it the image changed.
        changed = np.abs(defective.astype(float) - clean.astype(float)) > 1.0
        assert changed[label > 0].mean() > 0.5
        assert changed[label == 0].mean() < 0.1


def test_anatomy_labels_are_hot_spots_in_the_brain(tmp_path):
    clean, _, _ = families.anatomy_subject(np.random.default_rng([7, 1]), "val", 64, anomalous=False)
    hot, label, desc = families.anatomy_subject(np.random.default_rng([7, 1]), "val", 64, anomalous=True)
    assert desc["spots"] and label.any()
    assert hot[label > 0].mean() > clean[label > 0].mean() + 2.0     # SUV units
    assert clean.max() < 15 and np.median(clean[clean > 1]) > 2     # PET-like range: grey matter a few SUV


@pytest.mark.parametrize("family", families.FAMILIES)
def test_the_same_seed_gives_the_same_cohort_and_another_seed_another(tmp_path, family):
    _, a, la = cohort(tmp_path / "a", family, 4, 0.5, 3, "train", 32)
    _, b, lb = cohort(tmp_path / "b", family, 4, 0.5, 3, "train", 32)
    _, c, _ = cohort(tmp_path / "c", family, 4, 0.5, 4, "train", 32)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(la[k], lb[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_splits_draw_from_disjoint_parts_of_the_source_images(tmp_path):
    rows = families.TEXTURE_ROWS
    assert rows["train"][1] <= rows["val"][0] and rows["val"][1] <= rows["test"][0]
    slabs = families.ANATOMY_SLICES
    assert slabs["train"][1] <= slabs["val"][0] and slabs["val"][1] <= slabs["test"][0]
    for split in families.SPLITS:
        m = families.make_family_cohort(tmp_path / f"t_{split}", "texture", 12, 0.5, 0, split, 64)
        for s in m["subjects"]:
            r0, _, size = s["crop"]
            assert rows[split][0] <= r0 and r0 + size <= rows[split][1]
        m = families.make_family_cohort(tmp_path / f"a_{split}", "anatomy", 12, 0.5, 0, split, 32)
        assert all(slabs[split][0] <= s["slice_z"] < slabs[split][1] for s in m["subjects"])


def test_cohorts_are_in_the_layout_the_core_reads_and_other_folders_are_refused(tmp_path):
    families.make_family_cohort(tmp_path / "c", "texture", 3, 1.0, 0, "test", 32)
    records = list_images(tmp_path / "c" / "images")
    assert len(records) == 3 and all((tmp_path / "c" / "labels" / r.image.name).is_file() for r in records)
    families.make_family_cohort(tmp_path / "c", "texture", 2, 0.0, 0, "test", 32)  # its own earlier cohort: replaced
    assert len(list((tmp_path / "c" / "images").iterdir())) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        families.make_family_cohort(tmp_path / "other", "texture", 2, 0.0, 0, "test", 32)
    with pytest.raises(InputError, match="split"):
        families.make_family_cohort(tmp_path / "d", "texture", 2, 0.0, 0, "holdout", 32)


def test_the_module_cli_writes_a_cohort(tmp_path):
    assert families.main(["--family", "anatomy", "--out", str(tmp_path / "c"), "--split", "val", "--fraction",
                          "0.5", "--n", "4", "--seed", "0", "--size", "32"]) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text(encoding="utf-8"))
    assert (m["family"], m["split"], m["n_anomalous"]) == ("anatomy", "val", 2)


def test_the_benchmark_takes_a_data_family(tmp_path):
    args = parse("--out", tmp_path / "s", "--dims", "2", "--fractions", "1", "--n-train", "4", "--n-test", "4",
                  "--size", "32", "--methods", "intensity", "--data-family", "texture")
    assert args.handler(args, Reporter("none")) == 0
    test = json.loads((tmp_path / "s" / "test" / "manifest.json").read_text(encoding="utf-8"))
    assert (test["family"], test["split"], test["n_anomalous"], test["seed"]) == ("texture", "test", 2, 1000)
    assert (tmp_path / "s" / SWEEP_CSV).is_file()
    assert "--data-family texture" in command_line(settings_from_args(args))
    stored = json.loads((tmp_path / "s" / "benchmark.json").read_text(encoding="utf-8"))
    assert stored["settings"]["data_family"] == "texture"
    # Phantom sweeps record no data_family, as before the option existed.
    phantom = settings_from_args(parse("--out", tmp_path / "p"))
    assert "data_family" not in phantom.identity() and "--data-family" not in command_line(phantom)
    with pytest.raises(InputError, match="2D"):
        settings_from_args(parse("--out", tmp_path / "q", "--dims", "3", "--data-family", "anatomy"))


def test_the_benchmark_can_hold_out_the_validation_split(tmp_path):
    args = parse("--out", tmp_path / "s", "--dims", "2", "--fractions", "1", "--n-train", "4", "--n-test", "4",
                 "--size", "32", "--methods", "intensity", "--data-family", "anatomy", "--eval-split", "val")
    assert args.handler(args, Reporter("none")) == 0
    held_out = json.loads((tmp_path / "s" / "test" / "manifest.json").read_text(encoding="utf-8"))
    assert (held_out["family"], held_out["split"]) == ("anatomy", "val")
    assert "--eval-split val" in command_line(settings_from_args(args))
    stored = json.loads((tmp_path / "s" / "benchmark.json").read_text(encoding="utf-8"))
    assert stored["settings"]["eval_split"] == "val"
    # The same folder cannot switch to the test split: its rows were scored on the validation scans.
    again = parse("--out", tmp_path / "s", "--dims", "2", "--fractions", "1", "--n-train", "4", "--n-test", "4",
                  "--size", "32", "--methods", "intensity", "--data-family", "anatomy")
    with pytest.raises(InputError, match="eval_split"):
        again.handler(again, Reporter("none"))
    with pytest.raises(InputError, match="phantom has no splits"):
        settings_from_args(parse("--out", tmp_path / "q", "--eval-split", "val"))
