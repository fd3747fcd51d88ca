"""Atomic, versioned torch checkpoints whose failures name the file instead of raising from inside torch."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .io import _atomic_target


def save_checkpoint(path: str | Path, fmt: str, version: int, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format tag and version) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        torch.save({"format": fmt, "format_version": version, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, fmt: str, version: int, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file is missing")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(path, f"not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise InputError(path, f"not an {fmt} checkpoint")
    if payload.get("format_version") != version:
        raise InputError(path, f"written by an incompatible version (format {payload.get('format_version')}, "
                               f"this iltm reads {version})")
    return payload
