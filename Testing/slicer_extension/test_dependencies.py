"""Dependencies: checked without importing them, installed only after confirmation, through the right installer.

Slicer's installers (PyTorchUtils, slicer.packaging.pip_ensure of Slicer 5.12+, slicer.util.pip_install) are
replaced by recorders, which also keep the constraints file pip would get: nothing is ever installed by these
tests. The installed versions are faked too (``installed_version``), so the pins do not depend on this machine.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import slicer
from ILTMAnomalyLib import PanelError, dependencies


def test_requirements_file_parses_and_lists_the_core_needs():
    requirements = dependencies.read_requirements()
    names = {dependencies.requirement_name(r).lower() for r in requirements}
    assert {"monai", "einops", "pyyaml", "scipy"} <= names
    # torch comes through the PyTorch extension; numpy and SimpleITK are Slicer's own and must stay so.
    assert not names & {"torch", "numpy", "simpleitk"}
    # The DICOM commands (iltm suv, detect --dicom-seg) need these inside Slicer too.
    assert {"pydicom", "highdicom"} <= names


def test_satisfaction_uses_installed_versions():
    assert dependencies.is_satisfied("numpy>=1.0")
    assert not dependencies.is_satisfied("numpy<1.0")
    assert not dependencies.is_satisfied("surely-not-an-installed-package-xyz")
    # A module without distribution metadata (as Slicer bundles some) counts as installed.
    assert dependencies.is_satisfied("json>=1.0")
    assert dependencies.requirement_name("monai[nibabel]>=1.4") == "monai"


INSTALLED = {"torch": "2.5.1+cu121", "numpy": "1.26.4", "SimpleITK": "2.4.0"}


def _constraints(path):
    return sorted(Path(path).read_text(encoding="utf-8").split())


@pytest.fixture
def installers(monkeypatch):
    """Record what would be installed: a PyTorchUtils module, slicer.packaging and slicer.util.pip_install."""
    calls = []

    class TorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("PyTorchUtils", askConfirmation, torchVersionRequirement))
            return types.SimpleNamespace(__version__="2.5.1")

    def pip_ensure(reqs, constraints=None, **options):
        calls.append(("pip_ensure", [str(r) for r in reqs], _constraints(constraints), options))

    def pip_install(args):
        args = list(args)
        assert args[0] == "-c", "pip_install without a constraints file"
        calls.append(("pip_install", args[2:], _constraints(args[1])))

    torch_utils = types.ModuleType("PyTorchUtils")
    torch_utils.PyTorchUtilsLogic = TorchLogic
    packaging_module = types.ModuleType("slicer.packaging")
    packaging_module.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging_module)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(dependencies, "installed_version", INSTALLED.get)
    return calls


def test_nothing_happens_when_everything_is_installed(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: [])
    assert dependencies.install(confirm=lambda text: pytest.fail("must not ask")) is True
    assert installers == []


def test_declining_installs_nothing(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["torch>=2.1,<3", "monai>=1.4"])
    monkeypatch.setattr(dependencies, "installed_version", lambda name: None)
    asked = []
    assert dependencies.install(confirm=lambda text: asked.append(text) or False) is False
    assert "torch>=2.1,<3" in asked[0] and "monai>=1.4" in asked[0]
    assert installers == []


def test_confirmed_install_pins_the_installed_torch_for_pip_ensure(installers, monkeypatch):
    missing = [["monai>=1.4", "einops>=0.7"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    name, requirements, constraints, options = installers[0]
    assert name == "pip_ensure" and requirements == ["monai>=1.4", "einops>=0.7"]
    # monai 1.6 wants torch >= 2.8: without the pin pip would swap PyTorchUtils' CUDA build for PyPI's.
    assert constraints == ["SimpleITK==2.4.0", "numpy==1.26.4", "torch==2.5.1+cu121"]
    assert options == {"prompt_install": False, "requester": "ILTMAnomaly"}
    assert len(installers) == 1


def test_torch_from_pytorchutils_then_the_rest_pinned_to_it(installers, monkeypatch):
    versions = {"numpy": "1.26.4"}
    monkeypatch.setattr(dependencies, "installed_version", versions.get)
    missing = [["torch>=2.1,<3", "monai>=1.4"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))

    def install_torch(self, askConfirmation, torchVersionRequirement):
        installers.append(("PyTorchUtils", askConfirmation, torchVersionRequirement))
        versions["torch"] = "2.4.0+cu118"
        return types.SimpleNamespace(__version__="2.4.0")
    monkeypatch.setattr(sys.modules["PyTorchUtils"].PyTorchUtilsLogic, "installTorch", install_torch)
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    assert installers[0] == ("PyTorchUtils", False, ">=2.1,<3")
    assert installers[1][0] == "pip_ensure" and installers[1][2] == ["numpy==1.26.4", "torch==2.4.0+cu118"]


def test_slicer_without_pip_ensure_uses_pip_install_with_the_constraints(installers, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)     # import fails: Slicer 5.8 and 5.10
    missing = [["monai>=1.4", "pydicom>=2.4"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    assert installers == [("pip_install", ["monai>=1.4", "pydicom>=2.4"],
                           ["SimpleITK==2.4.0", "numpy==1.26.4", "torch==2.5.1+cu121"])]


def test_no_pytorch_extension_installs_torch_with_pip(installers, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)          # no PyTorch extension either
    monkeypatch.setattr(dependencies, "installed_version", lambda name: None)
    missing = [["torch>=2.1,<3"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    assert installers == [("pip_install", ["torch>=2.1,<3"], [])]


def test_an_old_torch_gets_a_clear_message_and_is_not_replaced(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "installed_version", {"torch": "2.0.1+cu117"}.get)
    monkeypatch.setattr(dependencies, "is_satisfied", lambda requirement: False)
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["torch>=2.1,<3", "monai>=1.4"])
    with pytest.raises(PanelError) as error:
        dependencies.install(confirm=lambda text: pytest.fail("must not offer an install that cannot work"))
    assert "PyTorch 2.0.1+cu117 is installed" in str(error.value) and "PyTorch Utils" in str(error.value)
    assert "Restart Slicer and try again" not in str(error.value)
    assert installers == []


def test_still_missing_after_install_is_an_error(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["monai>=1.4"])
    with pytest.raises(PanelError, match="still missing after installation: monai>=1.4"):
        dependencies.install(confirm=lambda text: True, log=lambda text: None)


def test_module_names_only_installers_slicer_has():
    """slicer.pydeps never existed; slicer.packaging.pip_ensure exists from Slicer 5.12 (not in 5.10.0)."""
    text = Path(dependencies.__file__).read_text(encoding="utf-8")
    assert "pydeps" not in text
