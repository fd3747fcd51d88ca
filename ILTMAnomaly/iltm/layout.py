"""The run-folder and output contract: names, suffixes, the format version and the default tau.

Standard library only: the core, the Slicer module's MRML glue (``ILTMAnomalyLib``, which must browse a run in a
Slicer without torch) and the tests' fake CLI all import it, and nothing else spells these names.

::

    RUN/config.yaml                       full config (preset + overrides), written first
    RUN/manifest.json                     training scans (id, path) and the model's input geometry
    RUN/vqvae.pt                          the trained VQ-VAE (vqvae_checkpoint.pt while it trains)
    RUN/vqvae_attempt<n>.pt               with vqvae.collapse_retries: a partly collapsed VQ-VAE set aside
    RUN/tokens.pt                         token rasters of every training scan (computed once)
    RUN/history.json                      one record per finished ILTM iteration (+ VQ-VAE summary, the best
                                          iteration and ``detection_iteration``, the one ``detect`` uses)
    RUN/iteration_000/transformer.pt      that iteration's full-cohort Transformer (the one ``detect`` uses); with
                                          iltm.full_transformers = used only that of ``detection_iteration``
    RUN/iteration_000/folds/transformer_fold<j>.pt  with iltm.cross_fit_folds = K: fitted without fold j
    RUN/iteration_000/masks/<id>_mask.nii.gz        its binary map of each training scan (scan geometry)
    RUN/iteration_000/token_masks/<id>.npy          the same map on the latent grid (masks iteration 1)

``iltm detect`` writes ``<id>_score.nii.gz`` (-log density) and ``<id>_mask.nii.gz`` (score > -ln tau) per scan;
with ``--lesions`` also ``<id>_lesions.csv`` per scan and one ``scans.csv`` (per-scan totals) for the folder, with
``--dicom-seg`` on a DICOM series ``<id>_seg.dcm``.

A model bundle (``iltm export RUN --out MODEL.zip``) is a zip of what detection needs, and nothing that names or holds
a training scan (no manifest, tokens, masks or history)::

    MODEL.zip/metadata.json     BUNDLE_FORMAT, BUNDLE_VERSION, package versions, modality, grid, training summary
    MODEL.zip/config.yaml       the run's config
    MODEL.zip/vqvae.pt          the VQ-VAE: config, shapes and weights only
    MODEL.zip/transformer.pt    the exported iteration's Transformer: config, shapes and weights only

``iltm detect --run`` takes a run folder or a bundle.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, List, Optional

from .errors import InputError

FORMAT_VERSION = 1  # of config.yaml, manifest.json and history.json
DEFAULT_DENSITY_THRESHOLD = 0.005  # tau: a voxel whose density is below it is anomalous

SCORE_SUFFIX = "_score.nii.gz"
MASK_SUFFIX = "_mask.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"
LESIONS_SUFFIX = "_lesions.csv"
DICOM_SEG_SUFFIX = "_seg.dcm"
SCANS_TABLE = "scans.csv"
DETECTION_RECORD = "detect.json"  # in a detect output folder: the model, iteration and settings that made its maps

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
HISTORY = "history.json"
VQVAE = "vqvae.pt"
TOKENS = "tokens.pt"
TRANSFORMER = "transformer.pt"
ITERATION_FOLDER = re.compile(r"^iteration_(\d+)$")

BUNDLE_FORMAT = "iltm-model-bundle"
BUNDLE_VERSION = 1  # of a model bundle's layout and metadata.json
BUNDLE_SUFFIX = ".zip"
BUNDLE_METADATA = "metadata.json"
BUNDLE_MEMBERS = (BUNDLE_METADATA, CONFIG, VQVAE, TRANSFORMER)  # exactly these, at the top of the zip


def id_problem(scan_id: object) -> Optional[str]:
    """Why ``scan_id`` cannot name output files (``<id>_score.nii.gz``, a training mask), or None.

    An id is one path component: not empty, not ``.`` or ``..``, no ``/`` or ``\\``, no control characters, and
    valid UTF-8 (a name the imaging libraries can open). So whatever the ids, outputs stay inside their folder.
    """
    if not isinstance(scan_id, str) or not scan_id:
        return "an id must be a non-empty name"
    if scan_id in (".", ".."):
        return f"id {scan_id!r} is not a file name"
    if "/" in scan_id or "\\" in scan_id:
        return f"id {scan_id!r} contains a path separator; an id must be one file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in scan_id):
        return f"id {scan_id!r} contains control characters"
    try:
        scan_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"id {scan_id.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8"
    return None


def check_id(scan_id: object, where: str) -> str:
    """``scan_id`` when it can name output files (see :func:`id_problem`); otherwise an InputError at ``where``."""
    problem = id_problem(scan_id)
    if problem:
        raise InputError(where, f"{problem} (ids name the output files)")
    return scan_id  # type: ignore[return-value]


def empty_history() -> dict:
    """``history.json`` of a run that has not finished its first iteration."""
    return {"version": FORMAT_VERSION, "vqvae": None, "iterations": [], "finished": False, "stop_reason": None}


class RunLayout:
    """Where every file of a training run folder lives, and the JSON state read back with its version checked.

    Args:
        root: the run folder.
    """

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY

    @property
    def vqvae_path(self) -> Path:
        return self.root / VQVAE

    @property
    def tokens_path(self) -> Path:
        return self.root / TOKENS

    def iteration_dir(self, k: int) -> Path:
        return self.root / f"iteration_{k:03d}"

    def transformer_path(self, k: int) -> Path:
        return self.iteration_dir(k) / TRANSFORMER

    def fold_transformer_path(self, k: int, fold: int) -> Path:
        return self.iteration_dir(k) / "folds" / f"transformer_fold{fold}.pt"

    def mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "masks" / f"{check_id(scan_id, str(self.manifest_path))}{MASK_SUFFIX}"

    def token_mask_path(self, k: int, scan_id: str) -> Path:
        return self.iteration_dir(k) / "token_masks" / f"{check_id(scan_id, str(self.manifest_path))}.npy"

    def iteration_dirs(self) -> List[tuple]:
        """(k, folder) of every ``iteration_<k>`` folder, ascending."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.root.iterdir()
                 for m in [ITERATION_FOLDER.match(d.name)] if m and d.is_dir()]
        return sorted(found)

    def trained_iterations(self) -> List[int]:
        """Iterations whose Transformer exists, ascending."""
        return [k for k, d in self.iteration_dirs() if (d / TRANSFORMER).is_file()]

    def mask_iterations(self) -> List[int]:
        """Iterations that wrote image-space masks of the training scans, ascending."""
        return [k for k, d in self.iteration_dirs() if (d / "masks").is_dir()]

    def read_json(self, path: Path) -> Any:
        """A JSON object of the run folder whose ``version`` (when present) is ``FORMAT_VERSION``; ``history.json``
        and ``manifest.json`` also have their shape checked."""
        if not path.is_file():
            raise InputError(path, "file is missing from the run folder")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(path, "is not valid JSON (the run folder is damaged)") from None
        if not isinstance(value, dict):
            raise InputError(path, "is not a JSON object (the run folder is damaged)")
        version = value.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise InputError(path, f"written by an incompatible version (run format version {version}, "
                                   f"this iltm reads {FORMAT_VERSION})")
        shape_problem = {HISTORY: history_problem, MANIFEST: manifest_problem}.get(path.name)
        problem = shape_problem(value) if shape_problem else None
        if problem:
            raise InputError(path, f"{problem} (the run folder is damaged)")
        return value

    def history(self) -> dict:
        """``history.json``, its shape checked; an empty history when training has not finished its first
        iteration."""
        if not self.history_path.is_file():
            return empty_history()
        return self.read_json(self.history_path)

    def manifest(self) -> dict:
        """``manifest.json``, its shape checked (every id one file name, every image a path)."""
        return self.read_json(self.manifest_path)

    def spatial_dims(self) -> Optional[int]:
        """2 or 3 from ``manifest.json``; None when the run has no manifest or it does not say."""
        if not self.manifest_path.is_file():
            return None
        dims = self.manifest().get("spatial_dims")
        return int(dims) if dims in (2, 3) else None


# -- model bundles ---------------------------------------------------------------------------------------------

def is_bundle(path) -> bool:
    """True for a path that names a model bundle (a ``.zip`` file, or any zip archive); it may still be damaged."""
    path = Path(path)
    if path.suffix.lower() == BUNDLE_SUFFIX:
        return not path.is_dir()
    return path.is_file() and zipfile.is_zipfile(path)


def read_bundle_metadata(path, verify: bool = False) -> dict:
    """``metadata.json`` of a model bundle, after checking that the zip holds exactly :data:`BUNDLE_MEMBERS` and was
    written by a compatible version; ``verify`` also checks every member's CRC (reads the whole zip). Any problem
    is an InputError naming the bundle."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model bundle does not exist")
    try:
        with zipfile.ZipFile(path) as bundle:
            names = set(bundle.namelist())
            missing = [name for name in BUNDLE_MEMBERS if name not in names]
            if missing:
                raise InputError(path, f"not a complete iltm model bundle (missing {', '.join(missing)})")
            extra = sorted(names - set(BUNDLE_MEMBERS))
            if extra:
                raise InputError(path, f"not an iltm model bundle (unexpected member {extra[0]})")
            if verify:
                damaged = bundle.testzip()
                if damaged is not None:
                    raise InputError(path, f"model bundle is damaged ({damaged} fails its checksum)")
            text = bundle.read(BUNDLE_METADATA)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise InputError(path, f"not a readable zip archive, so not a model bundle ({exc.__class__.__name__})") from None
    try:
        metadata = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(path, f"{BUNDLE_METADATA} is not valid JSON (the model bundle is damaged)") from None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise InputError(path, f"{BUNDLE_METADATA} does not describe an iltm model bundle")
    version = metadata.get("bundle_version")
    if version != BUNDLE_VERSION:
        raise InputError(path, f"written by an incompatible version (bundle format version {version}, "
                               f"this iltm reads {BUNDLE_VERSION})")
    return metadata


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def history_problem(value: dict) -> Optional[str]:
    """What is wrong with the shape of a ``history.json`` object, or None."""
    iterations = value.get("iterations", [])
    if not isinstance(iterations, list):
        return "'iterations' is not a list"
    seen = set()
    for n, record in enumerate(iterations):
        if not isinstance(record, dict):
            return f"iterations[{n}] is not an object"
        k = record.get("iteration")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or k in seen:
            return f"iterations[{n}] has no valid 'iteration' number (got {k!r})"
        seen.add(k)
        for key, field in record.items():
            if key != "iteration" and field is not None and not _is_number(field):
                return f"iterations[{n}].{key} is {field!r}, not a number"
    if not isinstance(value.get("finished", False), bool):
        return "'finished' is not true or false"
    if not isinstance(value.get("stop_reason"), (str, type(None))):
        return "'stop_reason' is not text"
    for key in ("vqvae",):
        if not isinstance(value.get(key), (dict, type(None))):
            return f"'{key}' is not an object"
    attempts = value.get("vqvae_attempts", [])
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        return "'vqvae_attempts' is not a list of objects"
    return None


def manifest_problem(value: dict) -> Optional[str]:
    """What is wrong with the shape of a ``manifest.json`` object, or None."""
    images = value.get("images", [])
    if not isinstance(images, list):
        return "'images' is not a list"
    seen = set()
    for n, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"]:
            return f"images[{n}] is not an object with an 'image' path"
        problem = id_problem(item.get("id"))
        if problem:
            return f"images[{n}]: {problem}"
        if item["id"] in seen:
            return f"images[{n}]: id {item['id']!r} is listed twice"
        seen.add(item["id"])
    if value.get("spatial_dims", 2) not in (2, 3):
        return f"'spatial_dims' is {value.get('spatial_dims')!r}, not 2 or 3"
    size = value.get("spatial_size")
    if size is not None and (not isinstance(size, list) or not all(isinstance(n, int) and n > 0 for n in size)):
        return f"'spatial_size' is {size!r}, not a list of positive sizes"
    return None
