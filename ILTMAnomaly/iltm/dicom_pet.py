"""Write an image as a DICOM PET series (pydicom), with the SUV-relevant tags GE, Siemens and Philips scanners write.

Used by ``iltm synth --dicom`` (a synthetic cohort as DICOM PET series in Bq/mL) and by the tests of
:mod:`iltm.suv`, which need series with each odd case real scanners produce: a dose start time with or without its
date, a series time later than the first acquisition, per-slice acquisition times (decay correction NONE), per-slice
rescale slopes, counts with Philips' private scale factors, or SUV stored directly (units GML).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE_S = 6586.2  # 109.77 min, the value PET scanners write for fluorine-18
PHILIPS_PRIVATE_CREATOR = "Philips PET Private Group"
PHILIPS_SUV_FACTOR = (0x7053, 0x1000)  # rescaled counts x this = body-weight SUV
PHILIPS_ACTIVITY_FACTOR = (0x7053, 0x1009)  # rescaled counts x this = Bq/mL
_STORED_MAX = 32767  # signed 16-bit pixels, the scale each slice's RescaleSlope maps its maximum to

PerSlice = Union[float, Sequence[float], None]


@dataclass
class PetSeriesTags:
    """The header of a PET series as far as SUV depends on it. ``None`` leaves a tag out.

    Attributes:
        manufacturer: Manufacturer (0008,0070), e.g. "GE MEDICAL SYSTEMS", "SIEMENS", "Philips Medical Systems".
        units: Units (0054,1001) of the rescaled pixels: "BQML", "CNTS" or "GML".
        decay_correction: DecayCorrection (0054,1102): "START", "ADMIN" or "NONE".
        weight_kg: PatientWeight (0010,1030) in kg.
        dose_bq: RadionuclideTotalDose (0018,1074) in Bq.
        half_life_s: RadionuclideHalfLife (0018,1075) in s.
        injection: when the dose was given; written as RadiopharmaceuticalStartDateTime (0018,1078) and/or
            RadiopharmaceuticalStartTime (0018,1072) as the two flags below say.
        write_start_datetime: write (0018,1078) (with its date).
        write_start_time: write (0018,1072) (time of day only; a reader takes the date from SeriesDate).
        series: SeriesDate (0008,0021) and SeriesTime (0008,0031).
        acquisition: AcquisitionDate/Time (0008,0022/0032): one for every slice, or one per slice (first slice
            first); default: the series time.
        philips_suv_factor: Philips (7053,1000), one value or one per slice.
        philips_activity_factor: Philips (7053,1009), one value or one per slice.
        patient_id: PatientID (0010,0020); also the patient's name.
        series_description: SeriesDescription (0008,103E).
        uid_seed: UIDs derived from this (the same seed gives the same UIDs); None = random UIDs.
    """

    manufacturer: str = "SIEMENS"
    units: str = "BQML"
    decay_correction: str = "START"
    weight_kg: Optional[float] = 75.0
    dose_bq: Optional[float] = 370e6
    half_life_s: Optional[float] = F18_HALF_LIFE_S
    injection: Optional[datetime] = datetime(2024, 3, 5, 8, 30, 0)
    write_start_datetime: bool = True
    write_start_time: bool = True
    series: Optional[datetime] = datetime(2024, 3, 5, 9, 30, 0)
    acquisition: Union[datetime, List[datetime], None] = None
    philips_suv_factor: PerSlice = None
    philips_activity_factor: PerSlice = None
    patient_id: str = "SYNTH"
    series_description: str = "PET WB synthetic"
    uid_seed: Optional[str] = None
    corrected_image: List[str] = field(default_factory=lambda: ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"])


def _da(value: datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: datetime) -> str:
    return value.strftime("%H%M%S.%f")


def _per_slice(value: PerSlice, n: int, name: str) -> list:
    if value is None or np.isscalar(value) or isinstance(value, datetime):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} values for {n} slices")
    return value


def _uid(tags: PetSeriesTags, *parts) -> str:
    if tags.uid_seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(tags.uid_seed), *map(str, parts)])


def _geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values (z, y, x), spacing (x, y, z), origin (x, y, z), direction 3x3) of a 2D or 3D image, 2D as one slice."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    spacing, origin = list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.array(image.GetDirection(), dtype=float).reshape(image.GetDimension(), image.GetDimension())
    if image.GetDimension() == 2:
        values = values[None]
        spacing.append(spacing[0])
        origin.append(0.0)
        full = np.eye(3)
        full[:2, :2] = direction
        direction = full
    return values, np.array(spacing), np.array(origin), direction


def _series_dataset(tags: PetSeriesTags, n_slices: int) -> Dataset:
    """What every slice of the series shares: patient, study, series, isotope, equipment."""
    ds = Dataset()
    study_time = tags.series or datetime(2024, 1, 1, 12, 0, 0)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = PET_IMAGE_STORAGE
    ds.PatientName = tags.patient_id
    ds.PatientID = tags.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    if tags.weight_kg is not None:
        ds.PatientWeight = f"{tags.weight_kg:.6g}"
    ds.StudyInstanceUID = _uid(tags, "study")
    ds.StudyDate, ds.StudyTime = _da(study_time), _tm(study_time)
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "PT"
    ds.SeriesInstanceUID = _uid(tags, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = tags.series_description
    if tags.series is not None:
        ds.SeriesDate, ds.SeriesTime = _da(tags.series), _tm(tags.series)
    ds.Manufacturer = tags.manufacturer
    ds.ManufacturerModelName = "iltm synthetic"
    ds.FrameOfReferenceUID = _uid(tags, "frame of reference")
    ds.PositionReferenceIndicator = ""
    # PET Series module
    ds.Units = tags.units
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.CorrectedImage = list(tags.corrected_image)
    ds.RandomsCorrectionMethod = "DLYD"
    ds.DecayCorrection = tags.decay_correction
    ds.ReconstructionMethod = "OSEM"
    ds.NumberOfSlices = n_slices
    ds.CollimatorType = "NONE"
    # PET Isotope module
    drug = Dataset()
    drug.Radiopharmaceutical = "Fluorodeoxyglucose"
    if tags.injection is not None and tags.write_start_time:
        drug.RadiopharmaceuticalStartTime = _tm(tags.injection)
    if tags.injection is not None and tags.write_start_datetime:
        drug.RadiopharmaceuticalStartDateTime = _da(tags.injection) + _tm(tags.injection)
    if tags.dose_bq is not None:
        drug.RadionuclideTotalDose = f"{tags.dose_bq:.10g}"
    if tags.half_life_s is not None:
        drug.RadionuclideHalfLife = f"{tags.half_life_s:.10g}"
    drug.RadionuclidePositronFraction = "0.97"
    nuclide = Dataset()
    nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
    drug.RadionuclideCodeSequence = DicomSequence([nuclide])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([drug])
    return ds


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file (preamble, file meta, explicit VR little endian) with pydicom 2.4 or 3."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pydicom 2.x (Python 3.9, as in Slicer 5.8)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def write_pet_series(folder: Union[str, Path], image: sitk.Image, tags: PetSeriesTags) -> list[Path]:
    """Write ``image`` as one DICOM PET series, a file per slice, into ``folder`` (created; must not exist).

    Each slice is stored as signed 16-bit integers with its own RescaleSlope (its maximum maps to 32767), as PET
    scanners store them, so the rescaled values equal ``image`` to within 1/65534 of each slice's maximum. The
    folder appears whole or not at all (written beside it, then renamed).

    Args:
        folder: the series folder to create.
        image: 2D (one slice) or 3D, values in ``tags.units`` (Bq/mL, counts or SUV), not negative; its spacing,
            origin and direction become PixelSpacing, ImagePositionPatient and ImageOrientationPatient.
        tags: the header; see :class:`PetSeriesTags`.

    Returns:
        The files, one per slice, in slice order.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists")
    values, spacing, origin, direction = _geometry(image)
    if values.min() < 0:
        raise ValueError("PET values must not be negative")
    n = values.shape[0]
    acquisition = _per_slice(tags.acquisition if tags.acquisition is not None else tags.series, n, "acquisition")
    suv_factors = _per_slice(tags.philips_suv_factor, n, "philips_suv_factor")
    activity_factors = _per_slice(tags.philips_activity_factor, n, "philips_activity_factor")
    shared = _series_dataset(tags, n)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        paths = []
        for k in range(n):
            ds = Dataset()
            ds.update(shared)
            ds.SOPInstanceUID = _uid(tags, "instance", k)
            ds.InstanceNumber = k + 1
            ds.ImageIndex = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            if acquisition[k] is not None:
                ds.AcquisitionDate, ds.AcquisitionTime = _da(acquisition[k]), _tm(acquisition[k])
                ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
            ds.FrameReferenceTime = "0"
            ds.ActualFrameDuration = 180000
            ds.DecayFactor = "1"
            ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * spacing[2] * direction[:, 2]]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1])]
            ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), then column (x)
            ds.SliceThickness = f"{spacing[2]:.6f}"
            ds.SliceLocation = f"{float(origin[2] + k * spacing[2] * direction[2, 2]):.6f}"
            peak = float(values[k].max())
            slope = peak / _STORED_MAX if peak > 0 else 1.0
            stored = np.round(values[k] / slope).astype(np.int16)
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", "0", tags.units
            slope = float(ds.RescaleSlope)  # what a reader gets back from the DS text
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = stored.shape
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = stored.tobytes()
            if suv_factors[k] is not None or activity_factors[k] is not None:
                block = ds.private_block(0x7053, PHILIPS_PRIVATE_CREATOR, create=True)
                if suv_factors[k] is not None:
                    block.add_new(PHILIPS_SUV_FACTOR[1] & 0xFF, "DS", f"{suv_factors[k]:.10g}")
                if activity_factors[k] is not None:
                    block.add_new(PHILIPS_ACTIVITY_FACTOR[1] & 0xFF, "DS", f"{activity_factors[k]:.10g}")
            path = tmp / f"{k + 1:04d}.dcm"
            write_dataset(ds, path)
            paths.append(folder / path.name)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return paths


# The three ways scanners commonly label a static whole-body FDG series.
VENDOR_STYLES = ("GE", "SIEMENS", "PHILIPS")


def synthetic_tags(suv_image: sitk.Image, style: str, rng: np.random.Generator, patient_id: str,
                   uid_seed: Optional[str] = None) -> tuple[sitk.Image, PetSeriesTags]:
    """A plausible header for an FDG scan in a vendor's ``style``, and the image in that series' stored units
    whose body-weight SUV is ``suv_image``.

    GE: Bq/mL, decay corrected to the series start, the dose start as date and time. Siemens: Bq/mL, the dose start
    as time of day only. Philips: counts with the private SUV (7053,1000) and activity (7053,1009) scale factors.
    Weight 55-100 kg, dose 3.7 MBq/kg, uptake 55-75 min, all drawn from ``rng``.
    """
    weight = float(np.round(rng.uniform(55.0, 100.0), 1))
    dose = float(np.round(3.7e6 * weight, -4))
    injection = datetime(2024, 3, 5, 8, 0, 0) + timedelta(seconds=int(rng.integers(0, 6 * 3600)))
    series = injection + timedelta(seconds=int(rng.integers(55 * 60, 75 * 60)))
    decayed = dose * 2.0 ** (-(series - injection).total_seconds() / F18_HALF_LIFE_S)
    bq_per_ml_per_suv = decayed / (weight * 1000.0)
    common = dict(weight_kg=weight, dose_bq=dose, half_life_s=F18_HALF_LIFE_S, injection=injection, series=series,
                  patient_id=patient_id, uid_seed=uid_seed)
    if style == "GE":
        tags = PetSeriesTags(manufacturer="GE MEDICAL SYSTEMS", units="BQML", **common)
        return suv_image * bq_per_ml_per_suv, tags
    if style == "SIEMENS":
        tags = PetSeriesTags(manufacturer="SIEMENS", units="BQML", write_start_datetime=False, **common)
        return suv_image * bq_per_ml_per_suv, tags
    if style == "PHILIPS":
        counts_per_bq_ml = 0.25  # an arbitrary calibration: what the scanner stores per Bq/mL
        tags = PetSeriesTags(manufacturer="Philips Medical Systems", units="CNTS",
                             philips_suv_factor=1.0 / (bq_per_ml_per_suv * counts_per_bq_ml),
                             philips_activity_factor=1.0 / counts_per_bq_ml, **common)
        return suv_image * (bq_per_ml_per_suv * counts_per_bq_ml), tags
    raise ValueError(f"unknown vendor style {style!r} (one of {', '.join(VENDOR_STYLES)})")
