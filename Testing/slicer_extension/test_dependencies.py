"""Dependencies: checked without importing them, installed only after confirmation, through the right installer.

Slicer's installers (PyTorchUtils, slicer.pydeps, slicer.util.pip_install) are replaced by recorders: nothing
is ever installed by these tests.
"""

from __future__ import annotations

import sys
import types

import pytest

import slicer
from ILTMAnomalyLib import PanelError, dependencies


def test_requirements_file_parses_and_lists_the_core_needs():
    requirements = dependencies.read_requirements()
    names = {dependencies.requirement_name(r).lower() for r in requirements}
    assert {"monai", "einops", "pyyaml", "scipy"} <= names
    # torch comes through the PyTorch extension; numpy and SimpleITK are Slicer's own and must stay so.
    assert not names & {"torch", "numpy", "simpleitk"}


def test_satisfaction_uses_installed_versions():
    assert dependencies.is_satisfied("numpy>=1.0")
    assert not dependencies.is_satisfied("numpy<1.0")
    assert not dependencies.is_satisfied("surely-not-an-installed-package-xyz")
    # A module without distribution metadata (as Slicer bundles some) counts as installed.
    assert dependencies.is_satisfied("json>=1.0")
    assert dependencies.requirement_name("monai[nibabel]>=1.4") == "monai"


@pytest.fixture
def installers(monkeypatch):
    """Record what would be installed: a PyTorchUtils module, slicer.pydeps and slicer.util.pip_install."""
    calls = []

    class TorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("PyTorchUtils", askConfirmation, torchVersionRequirement))
            return types.SimpleNamespace(__version__="2.5.0")

    torch_utils = types.ModuleType("PyTorchUtils")
    torch_utils.PyTorchUtilsLogic = TorchLogic
    pydeps = types.ModuleType("slicer.pydeps")
    pydeps.pip_ensure = lambda reqs, **options: calls.append(("pip_ensure", [str(r) for r in reqs], options))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    monkeypatch.setattr(slicer.util, "pip_install", lambda reqs: calls.append(("pip_install", list(reqs))))
    return calls


def test_nothing_happens_when_everything_is_installed(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: [])
    assert dependencies.install(confirm=lambda text: pytest.fail("must not ask")) is True
    assert installers == []


def test_declining_installs_nothing(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["torch>=2.1,<3", "monai>=1.4"])
    asked = []
    assert dependencies.install(confirm=lambda text: asked.append(text) or False) is False
    assert "torch>=2.1,<3" in asked[0] and "monai>=1.4" in asked[0]
    assert installers == []


def test_confirmed_install_uses_pytorchutils_and_pip_ensure(installers, monkeypatch):
    missing = [["torch>=2.1,<3", "monai>=1.4", "einops>=0.7"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    assert installers[0] == ("PyTorchUtils", False, ">=2.1,<3")
    name, requirements, options = installers[1]
    assert name == "pip_ensure" and requirements == ["monai>=1.4", "einops>=0.7"]
    assert options == {"prompt_install": False, "requester": "ILTMAnomaly"}


def test_older_slicer_falls_back_to_pip_install(installers, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)        # import fails, as before Slicer 5.11
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)          # no PyTorch extension either
    missing = [["torch>=2.1,<3", "monai>=1.4"], []]
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: missing.pop(0))
    assert dependencies.install(confirm=lambda text: True, log=lambda text: None) is True
    assert installers == [("pip_install", ["torch>=2.1,<3"]), ("pip_install", ["monai>=1.4"])]


def test_still_missing_after_install_is_an_error(installers, monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: ["monai>=1.4"])
    with pytest.raises(PanelError, match="still missing after installation: monai>=1.4"):
        dependencies.install(confirm=lambda text: True, log=lambda text: None)
