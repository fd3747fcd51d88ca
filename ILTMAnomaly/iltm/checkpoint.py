"""Atomic, versioned torch checkpoints whose failures name the file instead of raising from inside torch."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .io import atomic_path, write_error


def save_checkpoint(path: str | Path, fmt: str, version: int, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format tag and version) to ``path`` through a temporary file and a rename.

    Payloads hold tensors and plain Python values only, so they load with ``weights_only=True``.
    """
    with atomic_path(path, verify=_zip_problem) as tmp:
        try:
            torch.save({"format": fmt, "version": version, **payload}, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a failed write as "file write failed"
            raise write_error(path, exc) from None


def _zip_problem(tmp: Path) -> str | None:
    """torch.save writes a zip archive: check every member's CRC, so a cut file never takes the final name."""
    try:
        with zipfile.ZipFile(tmp) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"the checkpoint came out incomplete ({exc.__class__.__name__})"
    return None if bad is None else f"the checkpoint came out damaged ({bad})"


def checkpoint_bytes(fmt: str, version: int, payload: dict[str, Any]) -> bytes:
    """What :func:`save_checkpoint` would write, as bytes (a member of a model bundle)."""
    buffer = io.BytesIO()
    torch.save({"format": fmt, "version": version, **payload}, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | Path, fmt: str, version: int, map_location: Any = "cpu",
                    what: str = "checkpoint", data: bytes | None = None, required: tuple = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; every failure is an InputError naming ``path``.

    Args:
        fmt: expected format tag (e.g. ``"iltm-transformer"``).
        version: the format version this code reads.
        what: how to call the file in messages ("Transformer checkpoint").
        data: the checkpoint's bytes (a bundle member); ``path`` then only names it in messages.
        required: keys the payload must hold (a checkpoint of the right format and the wrong shape is refused
            here, not met later as a KeyError).
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise InputError(path, f"{what} is missing")
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise InputError(path, f"{what} is empty")
    try:
        payload = torch.load(path if data is None else io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise InputError(path, f"not a readable {what} ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise InputError(path, f"not an {fmt} {what}")
    if payload.get("version") != version:
        raise InputError(path, f"written by an incompatible version (format {payload.get('version')}, "
                               f"this iltm reads {version})")
    missing = [key for key in required if key not in payload]
    if missing:
        raise InputError(path, f"{what} is damaged: it lacks {', '.join(missing)}")
    return payload
