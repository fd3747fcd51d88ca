"""A small DICOM PET series written with pydicom, for tests that need DICOM input (SEG, lesion tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from iltm.dicom_pet import write_dataset

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


def write_pet_series(folder: Path, bqml: np.ndarray, spacing=(4.0, 4.0, 3.0), origin=(-100.0, -120.0, 50.0),
                     shuffle: bool = True) -> list[Path]:
    """Write ``bqml`` ((z, y, x) activity in Bq/mL) as one PET series, one file per slice, axial (LPS).

    Files are named in a shuffled order (when ``shuffle``) so a reader must sort them by position.
    Returns the files in slice order (z ascending).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    n = bqml.shape[0]
    names = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = PET_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "PT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^PET", "PH001", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "20240102", "090000", "20240102", "100000"
        ds.AcquisitionTime = "100000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.Manufacturer = "Test"
        ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.SliceLocation = origin[2] + k * spacing[2]
        ds.Rows, ds.Columns = bqml.shape[1], bqml.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        slope = max(float(bqml[k].max()), 1.0) / 65000.0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        ds.RescaleType = "BQML"
        ds.PixelData = np.round(bqml[k] / float(ds.RescaleSlope)).astype(np.uint16).tobytes()
        write_dataset(ds, path)
        files.append(path)
    return files
