"""Body-weight SUV of a DICOM PET series, by the QIBA SUV pseudo-code (as Slicer's SUV factor calculator reads it).

SUVbw = activity concentration (Bq/mL) x body weight (g) / dose (Bq) decayed to the time the activity refers to:

- Units BQML: the rescaled pixels are Bq/mL. DecayCorrection START: the scanner decay-corrected every slice to the
  series' reference time, so the dose is decayed from injection to that time: the series date and time, or, when
  the series time is later than the earliest acquisition time (a series re-created after the scan), GE's private
  scan date and time (0009,100D) if present, else that earliest acquisition time.
  ADMIN: corrected to the injection itself, so no decay. NONE: not corrected, so the dose is decayed to each slice's
  own acquisition time and the factor differs per slice.
- The injection time is RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the series date; a
  time of day later than the scan's is taken as the evening before (a scan after midnight) when that makes an uptake
  time under 12 hours.
- Units CNTS (Philips): rescaled counts x the private SUV scale factor (7053,1000) are SUV; without it, rescaled
  counts x the activity concentration scale factor (7053,1009) are Bq/mL, and the BQML rules follow.
- Units GML: the pixels are already SUV (g/mL).

A missing or impossible value is one :class:`~iltm.errors.InputError` naming the tag and the ``iltm suv`` flag that
supplies it. The pixel data are read with SimpleITK's ImageSeriesReader, so the SUV image has the series' geometry;
each slice's RescaleSlope/Intercept is applied to that slice.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

UNITS = ("BQML", "CNTS", "GML")
DECAY_CORRECTIONS = ("START", "ADMIN", "NONE")
MAX_MIDNIGHT_UPTAKE = timedelta(hours=12)  # longest uptake a start time "after" the scan is read as the evening before
MAX_WEIGHT_KG = 700.0
GE_PRIVATE_CREATOR = "GEMS_PETD_01"  # its element (0009,xx0D) is the scan date and time QIBA falls back on
PHILIPS_SUV_FACTOR = (0x7053, 0x1000)
PHILIPS_ACTIVITY_FACTOR = (0x7053, 0x1009)

WEIGHT_FLAG, DOSE_FLAG, INJECTION_FLAG, HALF_LIFE_FLAG = "--weight KG", "--dose MBQ", "--injection-time HH:MM:SS", \
    "--half-life S"


@dataclass
class SUVFactors:
    """How a series' rescaled pixel values become SUV, and every value that went into it.

    Attributes:
        factors: (slices,) multiply slice k's rescaled pixel values by ``factors[k]`` to get SUV.
        units: the series' Units (0054,1001).
        decay_correction: its DecayCorrection (0054,1102) (None for GML, where it does not matter).
        weight_kg, dose_bq, half_life_s: what was used and, in ``sources``, where each came from.
        injection: the injection date and time used.
        reference: (slices,) the time each slice's activity refers to (all the same unless NONE).
        decay: (slices,) the fraction of the dose left at ``reference`` (1 for ADMIN).
        philips_factor: "(7053,1000)" or "(7053,1009)" for Philips counts, else None.
        sources: value name -> the tag or flag it came from.
    """

    factors: np.ndarray
    units: str
    decay_correction: Optional[str] = None
    weight_kg: Optional[float] = None
    dose_bq: Optional[float] = None
    half_life_s: Optional[float] = None
    injection: Optional[datetime] = None
    reference: list = field(default_factory=list)
    decay: Optional[np.ndarray] = None
    philips_factor: Optional[str] = None
    sources: dict = field(default_factory=dict)

    def describe(self) -> list[str]:
        """The lines ``iltm suv`` prints: the factor and every value it used."""
        lines = [f"units: {self.units}" + (f", decay correction: {self.decay_correction}"
                                           if self.decay_correction else "")]
        if self.weight_kg is not None:
            lines.append(f"weight: {self.weight_kg:g} kg ({self.sources['weight']})")
        if self.dose_bq is not None:
            lines.append(f"dose: {self.dose_bq / 1e6:.6g} MBq ({self.sources['dose']})")
        if self.half_life_s is not None:
            lines.append(f"half-life: {self.half_life_s:g} s ({self.sources['half_life']})")
        if self.injection is not None:
            lines.append(f"injection: {self.injection.isoformat(sep=' ')} ({self.sources['injection']})")
        if self.reference:
            first, last = min(self.reference), max(self.reference)
            span = first.isoformat(sep=" ") if first == last else \
                f"{first.isoformat(sep=' ')} to {last.isoformat(sep=' ')} (per slice)"
            lines.append(f"reference time: {span} ({self.sources['reference']})")
        if self.decay is not None:
            if self.decay_correction == "ADMIN":
                lines.append("decay: none (the images are decay-corrected to the injection)")
            else:
                minutes = [(r - self.injection).total_seconds() / 60 for r in self.reference]
                lines.append(f"decay: {_span(minutes, '.2f')} min after injection, "
                             f"dose left {_span(self.decay, '.6f')}")
        if self.philips_factor:
            lines.append(f"Philips scale factor: {self.philips_factor}")
        lines.append(f"SUV factor: {_span(self.factors, '.6g')} per rescaled pixel unit")
        return lines


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = float(np.min(values)), float(np.max(values))
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)} to {format(hi, fmt)}"


# -- DICOM dates and times ---------------------------------------------------------------------------------

def _parse_time(text: str) -> Optional[time]:
    """A DICOM TM ("HHMMSS.FFFFFF", "HHMM", "HH", or the old "HH:MM:SS") as a time, or None."""
    text = str(text).strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    try:
        return time(int(hh), int(mm or 0), int(ss or 0), int((frac or "0").ljust(6, "0")))
    except ValueError:
        return None


def _parse_date(text: str) -> Optional[date]:
    text = str(text).strip().replace(".", "").replace("-", "")
    try:
        return datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def _parse_datetime(text: str) -> Optional[datetime]:
    """A DICOM DT ("YYYYMMDDHHMMSS.FFFFFF", an optional &ZZXX offset ignored) as a naive datetime, or None."""
    text = re.sub(r"[+-]\d{4}$", "", str(text).strip())
    if len(text) < 8 or not text[:8].isdigit():
        return None
    day = _parse_date(text[:8])
    clock = _parse_time(text[8:]) if len(text) > 8 else time(0)
    return datetime.combine(day, clock) if day and clock else None


def _value(ds: Any, keyword: str) -> Any:
    value = getattr(ds, keyword, None)
    return None if value is None or str(value).strip() == "" else value


def _number(value: Any) -> Optional[float]:
    """A DS/IS value, or a private element read without its VR (bytes: text, or a little-endian double)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return float(bytes(value).decode("ascii").strip("\0 "))
        except (UnicodeDecodeError, ValueError):
            return struct.unpack("<d", bytes(value))[0] if len(value) == 8 else None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _private(ds: Any, tag: tuple[int, int]) -> Optional[float]:
    element = ds.get(tag)
    return None if element is None else _number(element.value)


def _acquired(ds: Any) -> Optional[datetime]:
    clock = _parse_time(_value(ds, "AcquisitionTime") or "")
    if clock is None:
        return None
    day = _parse_date(_value(ds, "AcquisitionDate") or "") or _parse_date(_value(ds, "SeriesDate") or "") or \
        _parse_date(_value(ds, "StudyDate") or "") or date(1900, 1, 1)
    return datetime.combine(day, clock)


# -- the factor ------------------------------------------------------------------------------------------------

def _supply(flag: str, from_cli: bool) -> str:
    return f"give {flag}" if from_cli else f"convert it with 'iltm suv SERIES --out OUT.nii.gz {flag}'"


def _same(datasets: list, keyword: str, where: str) -> Any:
    values = {str(_value(ds, keyword)) for ds in datasets}
    if len(values) > 1:
        raise InputError(where, f"{keyword} differs between the slices ({', '.join(sorted(values))}); "
                                "put each series in its own folder")
    return _value(datasets[0], keyword)


def _ge_scan_datetime(ds: Any) -> Optional[datetime]:
    """GE's private scan date and time, (0009,xx0D) of private creator GEMS_PETD_01, when present and readable."""
    try:
        element = ds.private_block(0x0009, GE_PRIVATE_CREATOR)[0x0D]
    except (KeyError, ValueError, AttributeError):
        return None
    value = element.value
    return _parse_datetime(value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or ""))


def _series_reference(datasets: list, where: str) -> tuple[datetime, str]:
    """The series' reference time for decay correction START (QIBA): the series date and time, unless the series
    time is later than the earliest acquisition time (a post-processed series); then GE's private scan date and time
    when the series has it, else the earliest acquisition time (as for a Siemens series with an altered time)."""
    first = datasets[0]
    series_clock = _parse_time(_value(first, "SeriesTime") or "")
    series_day = _parse_date(_value(first, "SeriesDate") or "") or _parse_date(_value(first, "StudyDate") or "") \
        or date(1900, 1, 1)
    acquired = [a for a in (_acquired(ds) for ds in datasets) if a is not None]
    earliest = min(acquired) if acquired else None
    if series_clock is not None:
        series = datetime.combine(series_day, series_clock)
        if earliest is None or series <= earliest:
            return series, "SeriesDate/SeriesTime (0008,0021/0031)"
    ge_scan = _ge_scan_datetime(first)
    if ge_scan is not None:  # QIBA: a post-processed GE series keeps the real scan time in a private tag
        return ge_scan, "GE private scan date and time (0009,100D)"
    if earliest is not None:
        return earliest, ("earliest AcquisitionTime (0008,0032): SeriesTime is later" if series_clock is not None
                          else "earliest AcquisitionTime (0008,0032): no SeriesTime")
    raise InputError(where, "SeriesTime (0008,0031) and AcquisitionTime (0008,0032) are both missing; "
                            "the scan time is unknown")


def _injection(drug: Any, reference: datetime, injection_time: Optional[str], where: str,
               from_cli: bool) -> tuple[datetime, str]:
    """The injection date and time: the flag, RadiopharmaceuticalStartDateTime, or RadiopharmaceuticalStartTime on
    the reference date (the evening before when the scan was after midnight)."""
    if injection_time is not None:
        clock, source, tag = _parse_time(injection_time), "--injection-time", "--injection-time"
        if clock is None:
            raise InputError("--injection-time", f"'{injection_time}' is not a time of day HH:MM:SS")
    else:
        stamp = _value(drug, "RadiopharmaceuticalStartDateTime") if drug is not None else None
        if stamp is not None:
            when = _parse_datetime(stamp)
            if when is None:
                raise InputError(where, f"RadiopharmaceuticalStartDateTime (0018,1078) '{stamp}' is not a DICOM "
                                        f"date-time; {_supply(INJECTION_FLAG, from_cli)}")
            if when > reference:
                raise InputError(where, f"RadiopharmaceuticalStartDateTime (0018,1078) {when.isoformat(sep=' ')} is "
                                        f"after the scan ({reference.isoformat(sep=' ')}); "
                                        f"{_supply(INJECTION_FLAG, from_cli)}")
            return when, "RadiopharmaceuticalStartDateTime (0018,1078)"
        text = _value(drug, "RadiopharmaceuticalStartTime") if drug is not None else None
        if text is None:
            raise InputError(where, "RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
                                    f"(0018,1072) are missing; {_supply(INJECTION_FLAG, from_cli)}")
        clock, source, tag = _parse_time(text), "RadiopharmaceuticalStartTime (0018,1072)", \
            "RadiopharmaceuticalStartTime (0018,1072)"
        if clock is None:
            raise InputError(where, f"RadiopharmaceuticalStartTime (0018,1072) '{text}' is not a DICOM time; "
                                    f"{_supply(INJECTION_FLAG, from_cli)}")
    when = datetime.combine(reference.date(), clock)
    if when > reference:
        when -= timedelta(days=1)
        if reference - when > MAX_MIDNIGHT_UPTAKE:
            raise InputError(where, f"{tag} {clock.isoformat()} is after the scan ({reference.time().isoformat()}); "
                                    f"{_supply(INJECTION_FLAG, from_cli)}")
        source += ", the day before the scan (a scan after midnight)"
    return when, source


def suv_factors(datasets: Sequence[Any], where: str | Path = "series", weight_kg: Optional[float] = None,
                dose_mbq: Optional[float] = None, injection_time: Optional[str] = None,
                half_life_s: Optional[float] = None, from_cli: bool = True) -> SUVFactors:
    """The per-slice SUV factors of one PET series from its headers (QIBA's rules; see the module docstring).

    Args:
        datasets: the slices' pydicom datasets (pixel data not needed), in the order of the image's z axis.
        where: the series, for error messages.
        weight_kg, dose_mbq, injection_time ("HH:MM:SS", on the scan's date), half_life_s: values that replace
            (or supply missing) PatientWeight, RadionuclideTotalDose, the radiopharmaceutical start time and
            RadionuclideHalfLife.
        from_cli: errors name the ``iltm suv`` flags directly (else they say to convert with ``iltm suv``).

    Raises:
        InputError: at ``where``, naming the tag (and the flag supplying it) that is missing or impossible.
    """
    where = str(where)
    datasets = list(datasets)
    if not datasets:
        raise InputError(where, "no DICOM slices")
    modality = _same(datasets, "Modality", where)
    if modality is not None and str(modality) != "PT":
        raise InputError(where, f"is not a PET series (Modality (0008,0060) is {modality}, not PT)")
    frames = _number(_value(datasets[0], "NumberOfFrames"))
    if frames is not None and frames > 1:
        raise InputError(where, "is a multi-frame (enhanced) PET image; only one-slice-per-file series are read")
    units = _same(datasets, "Units", where)
    units = str(units).strip().upper() if units is not None else None
    if units not in UNITS:
        raise InputError(where, f"Units (0054,1001) is {units or 'missing'}; body-weight SUV is computed from "
                                f"{', '.join(UNITS)} only")
    n = len(datasets)
    if units == "GML":
        return SUVFactors(factors=np.ones(n), units=units)

    result = SUVFactors(factors=np.ones(n), units=units)
    if units == "CNTS":
        suv_scale = [_private(ds, PHILIPS_SUV_FACTOR) for ds in datasets]
        if all(s is not None and s > 0 for s in suv_scale):
            result.factors = np.array(suv_scale, dtype=float)
            result.philips_factor = f"SUV (7053,1000) = {_span(result.factors, '.6g')}"
            return result
        activity_scale = [_private(ds, PHILIPS_ACTIVITY_FACTOR) for ds in datasets]
        if not all(s is not None and s > 0 for s in activity_scale):
            raise InputError(where, "Units (0054,1001) is CNTS without Philips' SUV scale factor (7053,1000) or "
                                    "activity concentration scale factor (7053,1009); counts cannot become SUV")
        result.factors = np.array(activity_scale, dtype=float)
        result.philips_factor = f"activity concentration (7053,1009) = {_span(result.factors, '.6g')} Bq/mL per count"
    decay_correction = _same(datasets, "DecayCorrection", where)
    decay_correction = str(decay_correction).strip().upper() if decay_correction is not None else None
    if decay_correction not in DECAY_CORRECTIONS:
        raise InputError(where, f"DecayCorrection (0054,1102) is {decay_correction or 'missing'} (one of "
                                f"{', '.join(DECAY_CORRECTIONS)} is needed)")
    result.decay_correction = decay_correction
    first = datasets[0]
    drugs = _value(first, "RadiopharmaceuticalInformationSequence")
    drug = drugs[0] if drugs else None

    if weight_kg is not None:
        if not 0 < weight_kg <= MAX_WEIGHT_KG:
            raise InputError("--weight", f"{weight_kg:g} kg is not a body weight (kg, in (0, {MAX_WEIGHT_KG:g}])")
        result.weight_kg, result.sources["weight"] = float(weight_kg), "--weight"
    else:
        weight = _number(_value(first, "PatientWeight"))
        if weight is None or weight <= 0 or weight > MAX_WEIGHT_KG:
            state = "missing" if weight is None else f"{weight:g} kg, not a body weight"
            raise InputError(where, f"PatientWeight (0010,1030) is {state}; {_supply(WEIGHT_FLAG, from_cli)}")
        result.weight_kg, result.sources["weight"] = weight, "PatientWeight (0010,1030)"

    if dose_mbq is not None:
        if not dose_mbq > 0:
            raise InputError("--dose", f"{dose_mbq:g} MBq: the injected dose must be above 0")
        result.dose_bq, result.sources["dose"] = float(dose_mbq) * 1e6, "--dose"
    else:
        dose = _number(_value(drug, "RadionuclideTotalDose")) if drug is not None else None
        if dose is None or dose <= 0:
            state = "missing" if dose is None else f"{dose:g} Bq"
            raise InputError(where, f"RadionuclideTotalDose (0018,1074) is {state}; {_supply(DOSE_FLAG, from_cli)}")
        result.dose_bq, result.sources["dose"] = dose, "RadionuclideTotalDose (0018,1074)"

    if decay_correction == "ADMIN":
        result.decay = np.ones(n)
        result.factors = result.factors * result.weight_kg * 1000.0 / result.dose_bq
        return result

    if half_life_s is not None:
        if not half_life_s > 0:
            raise InputError("--half-life", f"{half_life_s:g} s: the half-life must be above 0")
        result.half_life_s, result.sources["half_life"] = float(half_life_s), "--half-life"
    else:
        half_life = _number(_value(drug, "RadionuclideHalfLife")) if drug is not None else None
        if half_life is None or half_life <= 0:
            state = "missing" if half_life is None else f"{half_life:g} s"
            raise InputError(where, f"RadionuclideHalfLife (0018,1075) is {state}; "
                                    f"{_supply(HALF_LIFE_FLAG, from_cli)}")
        result.half_life_s, result.sources["half_life"] = half_life, "RadionuclideHalfLife (0018,1075)"

    if decay_correction == "NONE":
        reference = [_acquired(ds) for ds in datasets]
        if any(r is None for r in reference):
            raise InputError(where, "DecayCorrection (0054,1102) is NONE but a slice has no AcquisitionTime "
                                    "(0008,0032), so its decay is unknown")
        reference_source = "each slice's AcquisitionDate/AcquisitionTime (0008,0022/0032)"
        earliest = min(reference)
    else:
        series_reference, reference_source = _series_reference(datasets, where)
        reference, earliest = [series_reference] * n, series_reference
    result.injection, result.sources["injection"] = _injection(drug, earliest, injection_time, where, from_cli)
    result.reference, result.sources["reference"] = reference, reference_source
    seconds = np.array([(r - result.injection).total_seconds() for r in reference])
    result.decay = np.power(2.0, -seconds / result.half_life_s)
    result.factors = result.factors * result.weight_kg * 1000.0 / (result.dose_bq * result.decay)
    return result


# -- the image -------------------------------------------------------------------------------------------------

def series_files(folder: str | Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in the order SimpleITK stacks them (the image's z axis)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not found" if not folder.exists() else "is not a folder of DICOM slices")
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise InputError(folder, "folder holds no DICOM series")
        if len(series) > 1:
            raise InputError(folder, f"folder holds {len(series)} DICOM series; put each series in its own folder")
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_suv(source: str | Path, weight_kg: Optional[float] = None, dose_mbq: Optional[float] = None,
             injection_time: Optional[str] = None, half_life_s: Optional[float] = None,
             from_cli: bool = True) -> tuple[sitk.Image, SUVFactors]:
    """Read one DICOM PET series (a folder, or a single-slice file) as a float32 body-weight SUV image.

    The pixels come from SimpleITK's ImageSeriesReader (so the geometry is the series'), read as floating point so
    that each slice's own RescaleSlope/Intercept is applied; slice k is then multiplied by its SUV factor.

    Returns:
        (the SUV image, 3D, or 3D with one slice for a single file), the factors and the values used.
    """
    import pydicom

    source = Path(source)
    files = [str(source)] if source.is_file() else series_files(source)
    try:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:  # pydicom raises several types for damaged files
        raise InputError(source, f"pydicom cannot read the DICOM headers ({exc.__class__.__name__}: "
                                 f"{str(exc)[:120]})") from None
    factors = suv_factors(datasets, source, weight_kg=weight_kg, dose_mbq=dose_mbq, injection_time=injection_time,
                          half_life_s=half_life_s, from_cli=from_cli)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat64)
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(source, f"SimpleITK cannot read the pixel data: {str(exc).splitlines()[-1][:160]}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    values = sitk.GetArrayFromImage(image)
    if values.ndim != 3 or values.shape[0] != len(files):
        raise InputError(source, f"read {values.shape} voxels from {len(files)} files; expected one slice per file")
    suv = (values * factors.factors[:, None, None]).astype(np.float32)
    out = sitk.GetImageFromArray(suv, isVector=False)
    out.CopyInformation(image)
    return out, factors
