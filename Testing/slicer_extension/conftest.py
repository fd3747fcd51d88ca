"""Fixtures for the Slicer extension's tests: Slicer's real MRML from the ``slicer-core`` wheel, no Qt.

(This folder must not be called ``slicer``: the wheel's ``slicer`` package extends its path with every
``slicer`` folder on ``sys.path`` and imports what it finds there, and pytest puts ``Testing/`` on it.)

Every test here is marked ``slicer_core``. The wheel is a test requirement (``pip install slicer-core slicerio``);
without it these tests fail at collection with that instruction, unless ``ILTM_SKIP_SLICER_TESTS=1`` asks to
skip them on purpose. Tests that train with the real ``iltm`` core are also marked ``slow``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("ILTM_SKIP_SLICER_TESTS"):
    collect_ignore_glob = ["test_*.py"]
else:
    try:
        import slicer  # noqa: F401  (the slicer-core wheel)
    except ImportError as error:
        raise ImportError(
            "Testing/slicer_extension needs Slicer's MRML from the slicer-core wheel: "
            "pip install slicer-core slicerio (or set ILTM_SKIP_SLICER_TESTS=1 to skip these tests on purpose)") from error

from mrml_helpers import FAKE_CLI, phantom_pet, rotated_direction  # noqa: E402  (puts ILTMAnomaly/ on sys.path)


def pytest_configure(config):
    config.addinivalue_line("markers", "slicer_core: needs Slicer's MRML from the slicer-core wheel")
    config.addinivalue_line("markers", "slow: end-to-end tests that train models (still CPU-sized)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slicer_core)


@pytest.fixture
def app():
    """A fresh scene with Slicer's application logics and default colour nodes."""
    from ILTMAnomalyLib.rendering import CoreApplication

    return CoreApplication()


@pytest.fixture
def scene(app):
    return app.scene


@pytest.fixture
def fake_cli() -> list[str]:
    """Command that runs the protocol-speaking stand-in for ``iltm``."""
    return [sys.executable, str(FAKE_CLI)]


@pytest.fixture
def pet_file(tmp_path):
    """A rotated, anisotropic PET phantom written as NIfTI with SimpleITK (LPS geometry on disk)."""
    import SimpleITK as sitk

    pet, labels = phantom_pet()
    image = sitk.GetImageFromArray(pet)
    image.SetSpacing((2.0, 2.5, 4.0))
    image.SetOrigin((-31.5, 12.25, -80.0))
    image.SetDirection(tuple(rotated_direction().reshape(-1)))
    path = tmp_path / "pet.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def pet_node(scene, pet_file):
    from ILTMAnomalyLib import volumes

    return volumes.read_volume(scene, pet_file, "PET")
