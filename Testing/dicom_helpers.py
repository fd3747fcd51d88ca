"""A small DICOM PET series for tests that need DICOM input (SEG, lesion tables): the core's own writer
(:func:`iltm.dicom_pet.write_pet_series`), with its files renamed in a shuffled order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iltm.dicom_pet import PetSeriesTags
from iltm.dicom_pet import write_pet_series as write_series


def write_pet_series(folder: Path, bqml: np.ndarray, spacing=(4.0, 4.0, 3.0), origin=(-100.0, -120.0, 50.0),
                     shuffle: bool = True) -> list[Path]:
    """Write ``bqml`` ((z, y, x) activity in Bq/mL) as one PET series, one file per slice, axial (LPS).

    Files are named in a shuffled order (when ``shuffle``) so a reader must sort them by position.
    Returns the files in slice order (z ascending).
    """
    image = sitk.GetImageFromArray(np.asarray(bqml, dtype=np.float64))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    written = write_series(folder, image, PetSeriesTags(patient_id="PH001"))
    names = np.random.default_rng(0).permutation(len(written)) if shuffle else np.arange(len(written))
    files = [folder / f".IM{k:04d}.tmp" for k in range(len(written))]
    for path, tmp in zip(written, files):  # two steps: a new name may be an old one
        path.rename(tmp)
    return [tmp.rename(folder / f"IM{name:04d}.dcm") for tmp, name in zip(files, names)]
