"""A binary anomaly map as a DICOM Segmentation (highdicom) that references the DICOM series it was computed on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .io import atomic_path

# SNOMED CT codes of the segment: category "Morphologically abnormal structure", type "Lesion".
CATEGORY = ("49755003", "SCT", "Morphologically abnormal structure")
LESION = ("52988006", "SCT", "Lesion")
ALGORITHM_NAME = "ILTM"


def read_source_series(files: Sequence[Path]) -> list:
    """The pydicom datasets of a series' files, in the given (slice) order; a file pydicom cannot read is an
    InputError naming it."""
    import pydicom

    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(str(path)))
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise InputError(path, f"pydicom cannot read it ({exc.__class__.__name__}: {exc})") from None
    return datasets


def segmentation_dataset(mask: np.ndarray, source_images: Sequence, split_lesions: bool = False,
                         segment_names: Sequence[str] | None = None):
    """A highdicom Segmentation of ``mask`` on the grid of ``source_images``.

    Args:
        mask: (n_slices, rows, cols) or (rows, cols) for one slice, 0/1; slice k lies on ``source_images[k]``
            (the order :func:`iltm.io.dicom_series_files` gives and SimpleITK reads).
        source_images: pydicom datasets of the source series, one per slice.
        split_lesions: one segment per connected region (26-connected, largest first, as ``iltm.lesions``
            numbers them) instead of one "Lesion" segment.
        segment_names: segments chosen by the caller instead (the Slicer panel's, as the user edited them):
            ``mask`` holds label k (1-based) for the segment named ``segment_names[k - 1]``; ``split_lesions`` is
            then ignored.

    Returns:
        highdicom.seg.Segmentation (BINARY), every frame stored (empty ones too) so readers rebuild the whole grid.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from . import __version__
    from .lesions import label_regions

    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    rows, cols = int(source_images[0].Rows), int(source_images[0].Columns)
    if mask.shape != (len(source_images), rows, cols):
        raise ValueError(f"mask {mask.shape} does not match the series ({len(source_images)} slices of "
                         f"{rows}x{cols})")
    if segment_names is not None:
        # Segment Label and Tracking ID are LO: at most 64 characters, no backslash.
        names = [str(name).replace("\\", "/")[:64] for name in segment_names]
        if mask.min(initial=0) < 0 or mask.max(initial=0) > len(names):
            raise ValueError(f"labels run from {mask.min()} to {mask.max()} but {len(names)} segments are named")
        labels, count = mask, len(names)
    elif split_lesions:
        mask = mask > 0
        labels, count = label_regions(mask)
        names = [f"Lesion {k}" for k in range(1, count + 1)]
    else:
        labels, count = (mask > 0).astype(np.uint8), 1
        names = ["Lesion"]
    if count == 0:  # a SEG needs a segment: one empty "Lesion" says "looked, found nothing"
        labels, names = np.zeros_like(mask, dtype=np.uint8), ["Lesion"]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=__version__,
        family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(*CATEGORY),
            segmented_property_type=hd.sr.CodedConcept(*LESION),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=generate_uid(), tracking_id=name)
        for number, name in enumerate(names, start=1)]
    dtype = np.uint8 if len(names) < 256 else np.uint16
    return hd.seg.Segmentation(
        source_images=list(source_images), pixel_array=labels.astype(dtype),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=int(getattr(source_images[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="ILTMAnomaly",
        manufacturer_model_name=ALGORITHM_NAME, software_versions=f"iltm {__version__}", device_serial_number="1",
        content_label="ILTM", content_description="ILTM anomaly map", content_creator_name="ILTM^Algorithm", series_description="ILTM anomalies",
        omit_empty_frames=False)


def write_dicom_seg(mask: np.ndarray, source_files: Sequence[Path], path: Path, split_lesions: bool = False,
                    segment_names: Sequence[str] | None = None) -> Path:
    """Write ``mask`` as a DICOM SEG at ``path`` (atomically) referencing the series ``source_files`` (slice order);
    ``split_lesions`` and ``segment_names`` as :func:`segmentation_dataset` takes them."""
    datasets = read_source_series(source_files)
    try:
        seg = segmentation_dataset(mask, datasets, split_lesions=split_lesions, segment_names=segment_names)
    except (ValueError, AttributeError) as exc:
        # highdicom checks the source's geometry and modules; a series it rejects is the input's problem.
        raise InputError(Path(source_files[0]).parent, f"cannot be referenced by a DICOM SEG: {exc}") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path
