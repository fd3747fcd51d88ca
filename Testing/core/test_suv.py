"""Body-weight SUV from DICOM PET series (iltm.suv, ``iltm suv``), the DICOM PET writer and DICOM inputs in SUV.

Every expected SUV is computed here by hand from the tag values (SUV = Bq/mL x weight_g / (dose x 2^(-t/T))), not
with the code under test.
"""

from __future__ import annotations

import csv
from datetime import datetime

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cli_helpers import FAST, run_cli
from iltm.dicom_pet import F18_HALF_LIFE_S, PetSeriesTags, write_dataset, write_pet_series
from iltm.io import list_images, read_image
from iltm.suv import read_suv, series_files, suv_factors

T = F18_HALF_LIFE_S
DAY = datetime(2024, 3, 5)


def at(hh: int, mm: int, ss: int = 0, day: int = 5) -> datetime:
    return datetime(2024, 3, day, hh, mm, ss)


def slices_image(per_slice_values, shape=(6, 7), spacing=(2.0, 3.0, 4.0), origin=(-5.0, 10.0, 20.0)):
    """A (z, y, x) image whose slice k is constant ``per_slice_values[k]`` (so 16-bit storage is exact)."""
    values = np.stack([np.full(shape, v, dtype=np.float64) for v in per_slice_values])
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def per_slice_suv(img: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(img)
    assert np.allclose(array, array[:, :1, :1], rtol=1e-6)  # still constant within each slice
    return array[:, 0, 0].astype(float)


def write(tmp_path, values, name="series", **tags):
    folder = tmp_path / name
    write_pet_series(folder, slices_image(values), PetSeriesTags(**tags))
    return folder


ACTIVITY = [5000.0, 12000.0, 800.0]  # Bq/mL per slice


# -- each rule against a hand computation -----------------------------------------------------------------------

def test_start_decays_the_dose_from_injection_to_the_series_time(tmp_path):
    folder = write(tmp_path, ACTIVITY, weight_kg=80.0, dose_bq=350e6, injection=at(8, 30), series=at(9, 35))
    suv, factors = read_suv(folder)
    decayed = 350e6 * 2 ** (-(65 * 60) / T)
    expected = np.array(ACTIVITY) * 80_000 / decayed
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)
    assert factors.decay_correction == "START" and factors.reference == [at(9, 35)] * 3
    assert np.allclose(factors.decay, 2 ** (-3900 / T))


def test_admin_does_not_decay_the_dose(tmp_path):
    folder = write(tmp_path, ACTIVITY, decay_correction="ADMIN", weight_kg=70.0, dose_bq=300e6,
                   injection=at(8, 0), series=at(10, 0))
    suv, _ = read_suv(folder)
    assert np.allclose(per_slice_suv(suv), np.array(ACTIVITY) * 70_000 / 300e6, rtol=1e-5)


def test_none_decays_the_dose_to_each_slice_acquisition_time(tmp_path):
    acquired = [at(9, 30), at(9, 40), at(9, 52, 30)]
    folder = write(tmp_path, ACTIVITY, decay_correction="NONE", weight_kg=75.0, dose_bq=370e6,
                   injection=at(8, 30), series=at(9, 30), acquisition=acquired)
    suv, factors = read_suv(folder)
    minutes = np.array([60.0, 70.0, 82.5])
    expected = np.array(ACTIVITY) * 75_000 / (370e6 * 2 ** (-minutes * 60 / T))
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)
    assert len(set(np.round(factors.factors, 12))) == 3  # one factor per slice
    # the z axis of the image and the factors follow the slices' positions, not the order files were listed in
    assert factors.reference == acquired


def test_start_time_without_date_takes_the_series_date(tmp_path):
    with_date = write(tmp_path, ACTIVITY, name="a", injection=at(8, 30), series=at(9, 30))
    time_only = write(tmp_path, ACTIVITY, name="b", injection=at(8, 30), series=at(9, 30), write_start_datetime=False)
    a, fa = read_suv(with_date)
    b, fb = read_suv(time_only)
    assert "StartDateTime" in fa.sources["injection"] and "StartTime" in fb.sources["injection"]
    expected = np.array(ACTIVITY) * 75_000 / (370e6 * 2 ** (-3600 / T))
    assert np.allclose(per_slice_suv(a), expected, rtol=1e-5)
    assert np.allclose(per_slice_suv(b), expected, rtol=1e-5)


def test_start_datetime_wins_over_start_time(tmp_path):
    folder = write(tmp_path, ACTIVITY, injection=at(8, 30), series=at(9, 30))
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(folder)]
    for ds in datasets:
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = "090000"
    factors = suv_factors(datasets)
    assert factors.injection == at(8, 30)
    assert np.allclose(factors.factors, 75_000 / (370e6 * 2 ** (-3600 / T)), rtol=1e-12)


def test_scan_after_midnight_with_start_time_only(tmp_path):
    folder = write(tmp_path, ACTIVITY, injection=at(23, 40, day=5), series=at(0, 45, day=6),
                   write_start_datetime=False)
    suv, factors = read_suv(folder)
    assert factors.injection == at(23, 40, day=5)
    expected = np.array(ACTIVITY) * 75_000 / (370e6 * 2 ** (-65 * 60 / T))
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)


def test_earliest_acquisition_time_when_series_time_is_later(tmp_path):
    folder = write(tmp_path, ACTIVITY, injection=at(8, 30), series=at(10, 5),
                   acquisition=[at(9, 36), at(9, 30), at(9, 42)])
    suv, factors = read_suv(folder)
    assert factors.reference == [at(9, 30)] * 3
    expected = np.array(ACTIVITY) * 75_000 / (370e6 * 2 ** (-3600 / T))
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)


@pytest.mark.parametrize("series_time, expected_reference", [((10, 5), (9, 20)), ((9, 0), (9, 0))])
def test_ge_private_scan_time_of_a_post_processed_series(tmp_path, series_time, expected_reference):
    # QIBA: only when the series time is later than the acquisitions does GE's private scan time (0009,100D) count.
    folder = write(tmp_path, ACTIVITY, injection=at(8, 30), series=at(*series_time),
                   acquisition=[at(9, 36), at(9, 30), at(9, 42)])
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20240305092000")
        write_dataset(ds, f)
    suv, factors = read_suv(folder)
    assert factors.reference == [at(*expected_reference)] * 3
    uptake = (at(*expected_reference) - at(8, 30)).total_seconds()
    assert np.allclose(per_slice_suv(suv), np.array(ACTIVITY) * 75_000 / (370e6 * 2 ** (-uptake / T)), rtol=1e-5)


def test_counts_with_philips_suv_scale_factor(tmp_path):
    counts = [100.0, 2500.0, 40000.0]
    scale = [0.002, 0.0021, 0.0019]  # per slice, as (7053,1000) may be
    folder = write(tmp_path, counts, units="CNTS", manufacturer="Philips Medical Systems", philips_suv_factor=scale,
                   philips_activity_factor=0.25)
    suv, factors = read_suv(folder)
    assert np.allclose(per_slice_suv(suv), np.array(counts) * np.array(scale), rtol=1e-5)
    assert "7053,1000" in factors.philips_factor


def test_counts_with_philips_activity_concentration_factor(tmp_path):
    counts = [100.0, 2500.0, 40000.0]
    folder = write(tmp_path, counts, units="CNTS", philips_activity_factor=0.5, weight_kg=60.0, dose_bq=250e6,
                   injection=at(8, 0), series=at(9, 15))
    suv, _ = read_suv(folder)
    expected = np.array(counts) * 0.5 * 60_000 / (250e6 * 2 ** (-75 * 60 / T))
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)


def test_gml_is_already_suv(tmp_path):
    folder = write(tmp_path, [0.5, 3.0, 12.0], units="GML", weight_kg=None, dose_bq=None, injection=None)
    suv, factors = read_suv(folder)
    assert np.allclose(per_slice_suv(suv), [0.5, 3.0, 12.0], rtol=1e-5)
    assert np.all(factors.factors == 1)


def test_flags_replace_the_tags(tmp_path):
    folder = write(tmp_path, ACTIVITY, weight_kg=75.0, dose_bq=370e6, injection=at(8, 30), series=at(9, 30))
    suv, factors = read_suv(folder, weight_kg=90.0, dose_mbq=400.0, injection_time="08:50:00")
    expected = np.array(ACTIVITY) * 90_000 / (400e6 * 2 ** (-40 * 60 / T))
    assert np.allclose(per_slice_suv(suv), expected, rtol=1e-5)
    assert factors.sources["weight"] == "--weight" and factors.sources["injection"] == "--injection-time"


# -- geometry and pixel data ------------------------------------------------------------------------------------

def test_suv_image_has_the_series_geometry_and_per_slice_slopes(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (5, 9, 11))
    values[0] *= 32767 / values[0].max()  # slope exactly 1 on the first slice, very different slopes after it
    values[2] *= 1e5
    values[4] *= 1e-2
    img = sitk.GetImageFromArray(values)
    img.SetSpacing((2.0, 2.5, 3.27))
    img.SetOrigin((-100.0, 40.0, -300.5))
    angle = np.deg2rad(10)
    img.SetDirection([np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1])
    folder = tmp_path / "oblique"
    write_pet_series(folder, img, PetSeriesTags(units="GML"))
    suv, _ = read_suv(folder)
    assert suv.GetSize() == img.GetSize()
    assert np.allclose(suv.GetSpacing(), img.GetSpacing(), atol=1e-5)
    assert np.allclose(suv.GetOrigin(), img.GetOrigin(), atol=1e-5)
    assert np.allclose(suv.GetDirection(), img.GetDirection(), atol=1e-5)
    assert suv.GetPixelID() == sitk.sitkFloat32
    error = np.abs(sitk.GetArrayFromImage(suv) - values).max(axis=(1, 2)) / values.max(axis=(1, 2))
    assert error.max() < 2e-5
    # io's plain reading applies each slice's slope as well (the first slice's integer type used to truncate)
    plain = sitk.GetArrayFromImage(read_image(folder))
    assert (np.abs(plain - values).max(axis=(1, 2)) / values.max(axis=(1, 2))).max() < 2e-5


# -- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_prints_the_factor_and_every_value(tmp_path, capsys):
    folder = write(tmp_path, ACTIVITY, weight_kg=80.0, dose_bq=350e6, injection=at(8, 30), series=at(9, 35))
    out = tmp_path / "suv.nii.gz"
    assert run_cli("suv", folder, "--out", out) == 0
    text = capsys.readouterr().out
    factor = 80_000 / (350e6 * 2 ** (-3900 / T))
    for expected in ("BQML", "START", "80 kg", "350 MBq", "6586.2 s", "2024-03-05 08:30:00", "2024-03-05 09:35:00",
                     "65.00 min", f"{2 ** (-3900 / T):.6f}", f"{factor:.6g}"):
        assert expected in text, expected
    written = sitk.ReadImage(str(out))
    assert np.allclose(per_slice_suv(written), np.array(ACTIVITY) * factor, rtol=1e-5)


BAD_SERIES = {
    "no weight": (dict(weight_kg=None), "PatientWeight (0010,1030) is missing", "--weight KG"),
    "zero dose": (dict(dose_bq=0.0), "RadionuclideTotalDose (0018,1074) is 0 Bq", "--dose MBQ"),
    "injection after the scan": (dict(injection=at(10, 0), series=at(9, 30)),
                                 "RadiopharmaceuticalStartDateTime (0018,1078)", "--injection-time HH:MM:SS"),
    "start time after the scan": (dict(injection=at(10, 0), series=at(9, 30), write_start_datetime=False),
                                  "RadiopharmaceuticalStartTime (0018,1072)", "--injection-time HH:MM:SS"),
    "no injection time": (dict(injection=None), "RadiopharmaceuticalStartTime (0018,1072) are missing",
                          "--injection-time HH:MM:SS"),
    "no half-life": (dict(half_life_s=None), "RadionuclideHalfLife (0018,1075) is missing", "--half-life S"),
    "unknown units": (dict(units="PROPCNTS"), "Units (0054,1001) is PROPCNTS", ""),
    "counts without Philips factors": (dict(units="CNTS"), "(7053,1000)", ""),
}


@pytest.mark.parametrize("case", list(BAD_SERIES))
def test_cli_bad_tags_give_one_line_and_no_output(tmp_path, capsys, case):
    tags, problem, flag = BAD_SERIES[case]
    folder = write(tmp_path, ACTIVITY, **tags)
    out = tmp_path / "out" / "suv.nii.gz"
    assert run_cli("suv", folder, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"iltm: error: {folder}: ")
    assert problem in err and flag in err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cli_flag_supplies_a_missing_tag(tmp_path, capsys):
    folder = write(tmp_path, ACTIVITY, weight_kg=None, injection=at(8, 30), series=at(9, 30))
    out = tmp_path / "suv.nii.gz"
    assert run_cli("suv", folder, "--out", out, "--weight", "64") == 0
    assert "weight: 64 kg (--weight)" in capsys.readouterr().out
    expected = np.array(ACTIVITY) * 64_000 / (370e6 * 2 ** (-3600 / T))
    assert np.allclose(per_slice_suv(sitk.ReadImage(str(out))), expected, rtol=1e-5)


def test_cli_bad_flag_value(tmp_path, capsys):
    folder = write(tmp_path, ACTIVITY)
    assert run_cli("suv", folder, "--out", tmp_path / "s.nii.gz", "--injection-time", "8h30") == 2
    assert "iltm: error: --injection-time: '8h30' is not a time of day" in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists()


# -- iltm synth --dicom, and DICOM inputs in SUV ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dicom_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom_cohort")
    assert run_cli("synth", "--out", out, "--dims", "2", "--n", "4", "--size", "32", "32", "--seed", "1",
                   "--dicom") == 0
    return out


def test_synth_dicom_then_suv_recovers_the_phantom(tmp_path):
    out = tmp_path / "cohort"
    assert run_cli("synth", "--out", out, "--dims", "3", "--n", "3", "--size", "16", "16", "24", "--dicom") == 0
    vendors = set()
    for case in ("case000", "case001", "case002"):
        manufacturer = pydicom.dcmread(next((out / "dicom" / case).iterdir()), stop_before_pixels=True).Manufacturer
        vendors.add(manufacturer.split()[0].upper())
        assert run_cli("suv", out / "dicom" / case, "--out", tmp_path / f"{case}.nii.gz") == 0
        phantom = sitk.ReadImage(str(out / "images" / f"{case}.nii.gz"))
        suv = sitk.ReadImage(str(tmp_path / f"{case}.nii.gz"))
        truth = sitk.GetArrayFromImage(phantom)
        assert np.abs(sitk.GetArrayFromImage(suv) - truth).max() <= 1e-4 * truth.max()
        assert suv.GetSize() == phantom.GetSize()
        assert np.allclose(suv.GetOrigin(), phantom.GetOrigin()) and np.allclose(suv.GetSpacing(), phantom.GetSpacing())
    assert vendors == {"GE", "SIEMENS", "PHILIPS"}
    # a second synth into the same folder replaces the series instead of failing on them
    assert run_cli("synth", "--out", out, "--dims", "3", "--n", "2", "--size", "16", "16", "24", "--dicom") == 0
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["case000", "case001"]


def test_dicom_series_are_listed_as_one_image_each_and_read_in_suv(dicom_cohort, tmp_path):
    records = list_images(dicom_cohort / "dicom")
    assert [r.id for r in records] == ["case000", "case001", "case002", "case003"]
    assert [r.id for r in list_images(dicom_cohort / "dicom" / "case002")] == ["case002"]
    table = tmp_path / "scans.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([["image", "id"], [str(dicom_cohort / "dicom" / "case001"), "p1"]])
    (row,) = list_images(table)
    suv = read_image(row.image, units="suv")
    as_is = read_image(row.image)
    truth = sitk.GetArrayFromImage(read_image(dicom_cohort / "images" / "case001.nii.gz"))
    assert suv.GetDimension() == 2
    assert np.abs(sitk.GetArrayFromImage(suv) - truth).max() <= 1e-4 * truth.max()
    assert sitk.GetArrayFromImage(as_is).max() > 100 * truth.max()  # Bq/mL, not SUV
    # a NIfTI input is taken as already in SUV
    nifti = dicom_cohort / "images" / "case001.nii.gz"
    assert np.array_equal(sitk.GetArrayFromImage(read_image(nifti, units="suv")), truth)


def test_train_and_detect_on_dicom_series_in_suv(dicom_cohort, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--data", dicom_cohort / "dicom", "--out", run, "--preset", "tiny", "--max-iterations",
                   "0", *FAST, "--set", "data.units=suv", "--set", "data.clip_value=15") == 0
    assert "units: suv" in (run / "config.yaml").read_text()
    results = tmp_path / "results"
    assert run_cli("detect", "--run", run, "--input", dicom_cohort / "dicom" / "case000", "--out", results,
                   "--no-png") == 0
    score = sitk.ReadImage(str(results / "case000_score.nii.gz"))
    phantom = sitk.ReadImage(str(dicom_cohort / "images" / "case000.nii.gz"))
    assert score.GetSize() == phantom.GetSize() and np.allclose(score.GetOrigin(), phantom.GetOrigin())


def test_train_on_dicom_without_weight_names_the_series_and_the_way_out(dicom_cohort, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for case in ("case000", "case001"):
        folder = data / case
        folder.mkdir()
        for f in (dicom_cohort / "dicom" / case).iterdir():
            ds = pydicom.dcmread(f)
            if case == "case001":
                del ds.PatientWeight
            write_dataset(ds, folder / f.name)
    run = tmp_path / "run"
    assert run_cli("train", "--data", data, "--out", run, "--preset", "tiny", *FAST, "--set", "data.units=suv") == 2
    err = capsys.readouterr().err
    assert "case001: PatientWeight (0010,1030) is missing" in err and "iltm suv" in err and "--weight KG" in err
    assert not run.exists()
