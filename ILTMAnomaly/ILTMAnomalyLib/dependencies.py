"""The Python packages the core needs, checked without importing them, installed on first use only.

Nothing here runs at import time. :func:`missing_requirements` looks at installed distributions' metadata
(cheap, no import of torch); :func:`install` runs only after the caller's ``confirm`` callback said yes:

- torch through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA or CPU build
  that fits the machine), else plain pip;
- the rest from ``Resources/requirements.txt`` through ``slicer.pydeps.pip_ensure`` (Slicer 5.11+; the
  ``slicer.packaging`` spelling of some previews is accepted too), else ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Callable, Optional

from . import PanelError

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = "torch>=2.1,<3"
REQUESTER = "ILTMAnomaly"


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

    for module_name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        pip_ensure = getattr(module, "pip_ensure", None)
        if pip_ensure is None:
            continue
        from packaging.requirements import Requirement

        # Our own dialog already asked; the installer should not ask again.
        pip_ensure([Requirement(r) for r in requirements], prompt_install=False, requester=REQUESTER)
        return
    try:
        slicer.util.pip_install(requirements)
    except Exception as error:
        raise PanelError(f"pip could not install {', '.join(requirements)}: {error}") from None
