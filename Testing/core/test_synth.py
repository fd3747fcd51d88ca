"""iltm.synth: the synthetic PET-like cohort (determinism, labels that match the lesions, exact anomalous fraction)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from iltm.errors import InputError
from iltm.io import list_images
from iltm.synth import make_cohort, make_subject


def _arrays(out, case):
    img = sitk.ReadImage(str(out / case["image"]))
    lab = sitk.ReadImage(str(out / case["label"]))
    return img, lab, sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)


def test_2d_cohort_files_manifest_and_labels(tmp_path):
    calls = []
    start = time.perf_counter()
    manifest = make_cohort(tmp_path, dims=2, n=40, anomalous_fraction=0.3, seed=7,
                           progress=lambda done, total: calls.append((done, total)))
    assert time.perf_counter() - start < 10  # a second or two on a laptop core
    assert calls[-1] == (40, 40) and len(calls) == 40
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["dims"] == 2 and manifest["seed"] == 7 and manifest["version"] >= 1
    cases = manifest["subjects"]
    assert len(cases) == 40 and len({c["id"] for c in cases}) == 40
    assert sum(c["anomalous"] for c in cases) == round(0.3 * 40)
    for case in cases:
        img, lab, a, m = _arrays(tmp_path, case)
        assert img.GetDimension() == 2 and img.GetSize() == (64, 64)
        assert img.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
        assert img.GetSpacing() == lab.GetSpacing() and img.GetOrigin() == lab.GetOrigin()
        assert img.GetDirection() == (1.0, 0.0, 0.0, 1.0)
        assert set(np.unique(m)) <= {0, 1} and np.all(np.isfinite(a)) and a.min() >= 0
        components = ndimage.label(m, np.ones((3, 3)))[1]
        assert components == case["n_lesions"]
        assert (case["n_lesions"] >= 1) == case["anomalous"] and case["n_lesions"] <= 4
    # list_images pairs every image with its label
    records = list_images(tmp_path)
    assert [r.id for r in records] == [c["id"] for c in cases]
    assert all(r.label is not None and r.label.name == r.image.name for r in records)


def test_3d_cohort_is_fast_and_consistent(tmp_path):
    start = time.perf_counter()
    manifest = make_cohort(tmp_path, dims=3, n=6, anomalous_fraction=0.5, seed=1)
    assert time.perf_counter() - start < 15
    assert sum(c["anomalous"] for c in manifest["subjects"]) == 3
    for case in manifest["subjects"]:
        img, lab, a, m = _arrays(tmp_path, case)
        assert img.GetDimension() == 3 and img.GetSize() == tuple(manifest["size"])
        assert img.GetSpacing() == (4.0, 4.0, 4.0) and lab.GetSize() == img.GetSize()
        assert ndimage.label(m, np.ones((3, 3, 3)))[1] == case["n_lesions"]
        # SUV-like: the bladder (or a lesion) is the hottest thing, soft tissue is about 1
        body = a > 0.3
        assert 6.0 < a.max() < 30.0 and 0.5 < np.median(a[body]) < 1.6
        if case["anomalous"]:
            assert a[m > 0].mean() > 1.5 * np.median(a[body])  # lesions are hot spots


def test_reporter_as_progress(tmp_path):
    from iltm.progress import Reporter

    reporter = Reporter(mode="none")
    manifest = make_cohort(tmp_path, dims=2, n=3, anomalous_fraction=1.0, seed=0, size=(32, 32), progress=reporter)
    assert manifest["n_anomalous"] == 3


def test_custom_size(tmp_path):
    manifest = make_cohort(tmp_path, dims=3, n=2, anomalous_fraction=1.0, seed=0, size=(16, 16, 24))
    img, _, _, m = _arrays(tmp_path, manifest["subjects"][0])
    assert img.GetSize() == (16, 16, 24) and m.any()


def test_deterministic_given_seed(tmp_path):
    first = make_cohort(tmp_path / "a", dims=2, n=6, anomalous_fraction=0.5, seed=11)
    second = make_cohort(tmp_path / "b", dims=2, n=6, anomalous_fraction=0.5, seed=11)
    other = make_cohort(tmp_path / "c", dims=2, n=6, anomalous_fraction=0.5, seed=12)
    assert first == second and first != other
    for case in first["subjects"]:
        for key in ("image", "label"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / case[key])))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / case[key])))
            np.testing.assert_array_equal(a, b)
    a0 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / first["subjects"][0]["image"])))
    c0 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "c" / other["subjects"][0]["image"])))
    assert not np.array_equal(a0, c0)


@pytest.mark.parametrize("n, fraction", [(5, 0.0), (5, 1.0), (7, 0.5), (3, 0.34)])
def test_anomalous_fraction_is_exact(tmp_path, n, fraction):
    manifest = make_cohort(tmp_path, dims=2, n=n, anomalous_fraction=fraction, seed=0, size=(32, 32))
    assert sum(c["anomalous"] for c in manifest["subjects"]) == round(fraction * n)
    for case in manifest["subjects"]:
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / case["label"])))
        assert m.any() == case["anomalous"]


@pytest.mark.parametrize("dims, size", [(2, (64, 64)), (3, (40, 32, 56))])
def test_lesions_inside_body_clear_of_organs_and_varied(dims, size):
    suvs, sizes, counts, brains = [], [], [], []
    for i in range(12):
        subject = make_subject(np.random.default_rng([5, i]), dims, size, 4.0, anomalous=True)
        lesion = subject.label.astype(bool)
        assert lesion.any() and not (lesion & subject.organs).any() and not (lesion & ~subject.body).any()
        counts.append(len(subject.lesions))
        suvs += [les["suv"] for les in subject.lesions]
        sizes += [les["voxels"] for les in subject.lesions]
        brains.append(subject.image.max())
    assert len(set(counts)) >= 3  # 1 to 4 lesions
    assert min(suvs) < 6.0 < max(suvs)  # some fainter than the brain (6-9), some hotter
    assert max(sizes) >= 3 * min(sizes)


def test_healthy_subjects_differ_from_each_other():
    a = make_subject(np.random.default_rng(1), 2, (64, 64), 2.0, anomalous=False)
    b = make_subject(np.random.default_rng(2), 2, (64, 64), 2.0, anomalous=False)
    assert not a.label.any() and not b.label.any()
    assert np.abs(a.image - b.image).mean() > 0.05
    assert not np.array_equal(a.body, b.body)


def test_rerun_replaces_earlier_cohort_and_refuses_foreign_folder(tmp_path):
    make_cohort(tmp_path / "c", dims=2, n=5, anomalous_fraction=0.4, seed=0, size=(32, 32))
    make_cohort(tmp_path / "c", dims=2, n=3, anomalous_fraction=0.4, seed=0, size=(32, 32))
    assert len(list((tmp_path / "c" / "images").iterdir())) == 3
    assert len(list((tmp_path / "c" / "labels").iterdir())) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        make_cohort(tmp_path / "mine", dims=2, n=2, anomalous_fraction=0.5, seed=0)
    assert (tmp_path / "mine" / "thesis.tex").read_text(encoding="utf-8") == "precious"


@pytest.mark.parametrize("kwargs, where", [(dict(dims=4), "--dims"), (dict(n=0), "--n"),
                                           (dict(anomalous_fraction=1.5), "--anomalous-fraction"),
                                           (dict(size=(64, 64, 64)), "--size"), (dict(size=(8, 64)), "--size")])
def test_bad_arguments(tmp_path, kwargs, where):
    args = dict(dims=2, n=2, anomalous_fraction=0.5, seed=0) | kwargs
    with pytest.raises(InputError) as info:
        make_cohort(tmp_path / "x", **args)
    assert info.value.where == where
