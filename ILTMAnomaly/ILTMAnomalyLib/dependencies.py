"""The Python packages the core needs, checked without importing them, installed on first use only.

Nothing here runs at import time. :func:`missing_requirements` looks at installed distributions' metadata
(cheap, no import of torch); :func:`install` runs only after the caller's ``confirm`` callback said yes:

- torch through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA or CPU build
  that fits the machine), else plain pip. An installed torch is never replaced: one older than
  :data:`TORCH_REQUIREMENT` allows stops with a message that says how to update it;
- the rest from ``Resources/requirements.txt`` with a pip constraints file that pins the installed torch (and
  numpy and SimpleITK, Slicer's own builds), so pip picks versions of monai etc. that work with them instead of
  swapping the CUDA build PyTorchUtils chose for another one from PyPI. The installer is
  ``slicer.packaging.pip_ensure`` where Slicer has it (5.12 and later; Slicer 5.10.0 has no
  ``slicer.packaging``), else ``slicer.util.pip_install`` with ``-c constraints.txt``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional

from . import PanelError

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = "torch>=2.1,<3"
REQUESTER = "ILTMAnomaly"
# Installed distributions pip must keep as they are: torch (and its companions) as PyTorchUtils installed them,
# numpy and SimpleITK as Slicer ships them.
PINNED = ("torch", "torchvision", "torchaudio", "numpy", "SimpleITK")


def read_requirements(path=REQUIREMENTS_FILE) -> list[str]:
    """Requirement strings of a requirements file (comments, blank lines and pip options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]


# Distribution name -> import name, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-image": "skimage", "pillow": "PIL"}


def is_satisfied(requirement: str) -> bool:
    """Installed, in a version the specifier accepts.

    A module that imports but has no distribution metadata (bundled into Slicer by its build) counts as
    installed; the version check needs ``packaging`` and is skipped without it.
    """
    name = requirement_name(requirement)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(IMPORT_NAMES.get(name.lower(), name)) is not None
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: Optional[list[str]] = None, include_torch: bool = True) -> list[str]:
    requirements = list(requirements if requirements is not None else read_requirements())
    if include_torch:
        requirements.insert(0, TORCH_REQUIREMENT)
    return [r for r in requirements if not is_satisfied(r)]


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_problem() -> Optional[str]:
    """Why the installed torch cannot be used (None when it can, or when none is installed)."""
    version = installed_version("torch")
    if version is None or is_satisfied(TORCH_REQUIREMENT):
        return None
    return (f"PyTorch {version} is installed, but ILTMAnomaly needs PyTorch {TORCH_REQUIREMENT[len('torch'):]}. "
            "ILTMAnomaly does not replace an installed PyTorch (other extensions may rely on it): update it in "
            "the PyTorch Utils module (Uninstall PyTorch, restart Slicer, then install a version >= 2.1), "
            "then try again.")


def constraints_text() -> str:
    """A pip constraints file pinning every installed distribution of :data:`PINNED` to its installed version."""
    lines = []
    for name in PINNED:
        version = installed_version(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "".join(line + "\n" for line in lines)


def confirmation_text(missing: list[str]) -> str:
    return ("ILTMAnomaly needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads several hundred MB (PyTorch) and can take minutes. "
              "Slicer may need a restart afterwards.")


def install(confirm: Callable[[str], bool], log: Callable[[str], None] = print) -> bool:
    """Install whatever is missing, after ``confirm(message)`` returns True.

    Returns:
        True when everything is installed (now or already), False when the user declined.

    Raises:
        PanelError: an installation failed.
    """
    missing = missing_requirements()
    if not missing:
        return True
    problem = torch_problem()
    if problem:
        raise PanelError(problem)
    if not confirm(confirmation_text(missing)):
        return False
    if any(requirement_name(r) == "torch" for r in missing):
        log("Installing PyTorch...")
        _install_torch(log)
    rest = [r for r in missing if requirement_name(r) != "torch"]
    if rest:
        log("Installing " + ", ".join(rest) + "...")
        _pip(rest)
    still_missing = missing_requirements()
    if still_missing:
        raise PanelError("These packages are still missing after installation: " + ", ".join(still_missing)
                         + ". Restart Slicer and try again, or install them with the Python console.")
    log("All dependencies are installed.")
    return True


def _install_torch(log: Callable[[str], None]) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            specifier = TORCH_REQUIREMENT[len("torch"):]
            if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=specifier) is None:
                raise PanelError("PyTorch could not be installed (see the PyTorch Utils module for details).")
        return
    log("The PyTorch extension is not installed; installing the default torch build with pip.")
    _pip([TORCH_REQUIREMENT])


def _pip(requirements: list[str]) -> None:
    import slicer

    handle, constraints = tempfile.mkstemp(prefix="ILTMAnomaly-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(constraints_text())
        try:
            packaging_module = importlib.import_module("slicer.packaging")
        except ImportError:
            packaging_module = None
        pip_ensure = getattr(packaging_module, "pip_ensure", None)
        try:
            if pip_ensure is not None:
                from packaging.requirements import Requirement

                # Our own dialog already asked; the installer should not ask again.
                pip_ensure([Requirement(r) for r in requirements], constraints=constraints, prompt_install=False,
                           requester=REQUESTER)
            else:
                slicer.util.pip_install(["-c", constraints] + list(requirements))
        except Exception as error:
            raise PanelError(f"pip could not install {', '.join(requirements)} alongside the installed "
                             f"{', '.join(constraints_text().split()) or 'packages'}: {error}") from None
    finally:
        os.unlink(constraints)
