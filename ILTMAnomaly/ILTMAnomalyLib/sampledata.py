"""The module's Sample Data entry: a synthetic PET phantom with lesions, shipped with the extension (no download).

The file is made once by ``iltm_bench/make_demo_model.py`` (``iltm synth``, a held-out seed, on the grid of the demo
model) and registered as a Sample Data source whose URI is the local file, with its SHA-256, as Slicer's own
SampleData tests register local files: the Sample Data module copies it into its cache and loads it like any other
sample.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
SAMPLE_PET = RESOURCES / "SampleData" / "iltm-synthetic-pet.nii.gz"
SAMPLE_NAME = "ILTMSyntheticPET"
CATEGORY = "ILTM Anomaly"
THUMBNAIL = RESOURCES / "Icons" / "ILTMAnomaly.png"


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_arguments() -> dict:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for the synthetic PET."""
    return dict(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        sampleDescription="Synthetic PET (phantom with lesions, for the ILTM demo model)",
        thumbnailFileName=str(THUMBNAIL),
        uris=SAMPLE_PET.as_uri(),
        fileNames=SAMPLE_PET.name,
        nodeNames=SAMPLE_NAME,
        checksums=f"SHA256:{sha256(SAMPLE_PET)}",
        loadFileTypes="VolumeFile",
    )


def register(sample_data_logic) -> bool:
    """Register the synthetic PET with ``SampleData.SampleDataLogic`` (the class); False when the file is missing."""
    if not SAMPLE_PET.is_file():
        return False
    sample_data_logic.registerCustomSampleDataSource(**source_arguments())
    return True
