"""Image I/O with SimpleITK: reading with checks that name the file, atomic writing, cohort listing."""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, WriteError, printable
from .layout import id_problem

# Suffixes listed as images when a folder is scanned (lower case; compound ones first).
IMAGE_SUFFIXES = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img.gz", ".gipl", ".gipl.gz", ".vtk",
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm",
)
_STEM_SUFFIXES = IMAGE_SUFFIXES + (".csv",)


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_error(path: str | Path, exc: BaseException | None = None, problem: str | None = None) -> InputError:
    """The InputError for a write to ``path`` that failed or came out short, naming the cause in words.

    An OSError's errno gives the cause ("no space left on device", "read-only file system"); a writer that hides it
    (SimpleITK, torch's zip writer) is checked against the free space left beside ``path``.
    """
    path = Path(path)
    if isinstance(exc, OSError) and exc.errno:
        cause = os.strerror(exc.errno)
        cause = cause[0].lower() + cause[1:]
    else:
        cause = problem or (f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}" if exc else "write failed")
        try:
            if shutil.disk_usage(_existing_ancestor(path.parent)).free < (1 << 20):
                cause = f"no space left on device ({cause})"
        except OSError:
            pass
    return WriteError(path, f"cannot write it: {cause}; nothing was written under this name")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _fsync(path: Path) -> None:
    # A delayed write error (a full disk under write-back caching) shows up here rather than after the rename.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, verify=None):
    """Yield a temporary path beside ``path``; on success it is checked and renamed to ``path``, on failure removed.

    A reader never sees half a file, and an interrupted write leaves nothing behind. The temporary name keeps the
    real suffix so that format-sniffing writers (SimpleITK, matplotlib) still work.

    Args:
        verify: ``tmp -> problem or None``, run on the finished temporary file before the rename: for writers that
            do not report a short write (SimpleITK). A problem, an OSError in the body, fsync or rename becomes
            an :class:`InputError` naming ``path`` and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{_write_suffix(path)}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be as readable as any other
        try:
            yield tmp
            _fsync(tmp)
            problem = verify(tmp) if verify is not None else None
            if problem:
                raise write_error(path, problem=problem)
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename, so no reader ever sees half a file."""
    data = text.encode("utf-8")
    with atomic_path(path, verify=lambda tmp: _size_problem(tmp, len(data))) as tmp:
        tmp.write_bytes(data)


def _size_problem(tmp: Path, expected: int) -> str | None:
    got = tmp.stat().st_size
    return None if got == expected else f"the file came out short ({got} of {expected} bytes)"


def check_output_folder(path: str | Path, where: str = "--out") -> Path:
    """Check, before any work, that ``path`` is or can become a writable folder; nothing is created.

    Raises:
        InputError: naming ``where`` and ``path`` when it is a file, lies under a file, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{where} exists and is not a folder")
    _check_writable(path if path.is_dir() else _existing_ancestor(path), path, where)
    return path


@contextlib.contextmanager
def removed_if_left_empty(folder: str | Path):
    """Remove ``folder`` afterwards when this block created it and it is still empty (a command that wrote nothing,
    e.g. because every input was bad or the disk is full, leaves no trace)."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        yield folder
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_output_file(path: str | Path, where: str = "--out") -> Path:
    """Check, before any work, that the file ``path`` can be written (its folder is or can become writable)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, f"{where} is a folder; give a file name")
    check_output_folder(path.parent, where)
    return path


def _check_writable(folder: Path, path: Path, where: str) -> None:
    if not folder.is_dir():
        raise InputError(path, f"{where} lies under {folder}, which is not a folder")
    try:  # an anonymous temporary file: works for root too, where os.access ignores permission bits
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InputError(path, f"{where} cannot be written ({cause[0].lower() + cause[1:]})") from None


# ----------------------------------------------------------------------------------------------- reading


def image_id(path: str | Path) -> str:
    """The id of an image: its file name without image extensions (``a/b/ct.nii.gz`` -> ``ct``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def _quiet_itk():
    # GDCM and some ImageIOs print warnings to stderr; the user gets our one-line message instead.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _short_reason(exc: Exception) -> str:
    """SimpleITK's exception text (source file, line, object address, several lines) cut to what a user needs."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "not a format it recognises"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    cleaned = []
    for ln in lines:
        ln = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", ln)
        ln = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", ln)
        ln = re.sub(r"^\[\w+\]\s*\w*:?\s*", "", ln)
        if ln and ln not in cleaned:
            cleaned.append(ln)
    reason = "; ".join(cleaned) or exc.__class__.__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _nifti_header(head: bytes):
    """(ndim_all, datatype, bitpix, vox_offset, endian) from a NIfTI-1 or NIfTI-2 header, or None."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
        if sizeof_hdr == 348:
            return (struct.unpack(endian + "8h", head[40:56]), struct.unpack(endian + "h", head[70:72])[0],
                    struct.unpack(endian + "h", head[72:74])[0], int(struct.unpack(endian + "f", head[108:112])[0]),
                    endian)
        if sizeof_hdr == 540 and len(head) >= 540:
            return (struct.unpack(endian + "8q", head[16:80]), struct.unpack(endian + "h", head[12:14])[0],
                    struct.unpack(endian + "h", head[14:16])[0], int(struct.unpack(endian + "q", head[168:176])[0]),
                    endian)
    return None


def _nifti_check(path: Path) -> tuple[str | None, int]:
    """What ITK's NIfTI reader hides: a truncated file reads as zeros, and NaN/inf voxels are read as 0.

    Streams the voxel data once. Returns (problem or None, number of non-finite voxels).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
            if len(head) < 348:
                return f"file is too short for a NIfTI header ({len(head)} bytes)", 0
            parsed = _nifti_header(head)
            if parsed is None:
                return None, 0  # not a header we understand; leave the verdict to ITK
            ndim_all, datatype, bitpix, vox_offset, endian = parsed
            ndim = int(ndim_all[0])
            if not 1 <= ndim <= 7 or bitpix <= 0 or vox_offset < 348:
                return None, 0
            n_voxels = int(np.prod([max(int(d), 1) for d in ndim_all[1: ndim + 1]], dtype=np.int64))
            expected = n_voxels * bitpix // 8
            dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(datatype)
            fh.seek(vox_offset)  # gzip emulates the forward seek by decompressing
            got, nonfinite, pending = 0, 0, b""
            while got < expected:
                chunk = pending + fh.read(min(1 << 22, expected - got - len(pending)))
                if len(chunk) == len(pending):
                    return f"file is truncated: {got} of {expected} bytes of voxel data", 0
                usable = len(chunk) - len(chunk) % dtype.itemsize if dtype is not None else len(chunk)
                if dtype is not None:
                    nonfinite += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype))))
                pending = chunk[usable:]
                got += usable
            return None, nonfinite
    except (EOFError, OSError, zlib.error) as exc:
        return f"the gzip stream is damaged or cut short ({exc.__class__.__name__})", 0


def dicom_series_files(path: str | Path) -> list[Path]:
    """The files of the one DICOM series in folder ``path``, in the order SimpleITK stacks them (slice k of the
    image read from the folder is file k).

    Raises:
        InputError: when the folder holds no DICOM series or more than one.
    """
    path = Path(path)
    with _quiet_itk():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_name(path))
    if not series:
        raise InputError(path, "folder holds no DICOM series (give an image file, or a folder of DICOM slices)")
    if len(series) > 1:
        raise InputError(path, f"folder holds {len(series)} DICOM series; put each series in its own folder")
    with _quiet_itk():
        return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_name(path), series[0])]


def _read_dicom_folder(path: Path) -> sitk.Image:
    files = dicom_series_files(path)
    reader = sitk.ImageSeriesReader()
    # Floating point output: otherwise the first slice's pixel type is kept and the other slices' own
    # RescaleSlope/Intercept are truncated to it (PET scanners give every slice its own slope).
    reader.SetOutputPixelType(sitk.sitkFloat64)
    with _quiet_itk():
        reader.SetFileNames([str(f) for f in files])
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise InputError(path, f"SimpleITK cannot read this DICOM series: {_short_reason(exc)}") from None


def _to_scalar(img: sitk.Image, path: Path) -> sitk.Image:
    n = img.GetNumberOfComponentsPerPixel()
    if n == 1:
        return img
    if img.GetDimension() == 2 and n in (2, 3, 4):
        if n == 2:  # grey + alpha
            return sitk.VectorIndexSelectionCast(img, 0, sitk.sitkFloat32)
        # RGB(A) photograph-like input: ITU-R BT.601 luma, as PIL's "L" conversion.
        channels = [sitk.VectorIndexSelectionCast(img, c, sitk.sitkFloat32) for c in range(3)]
        return 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]
    raise InputError(path, f"is a vector image with {n} components per voxel; give a single-channel (scalar) image")


def _collapse_dims(img: sitk.Image, path: Path) -> sitk.Image:
    """Drop singleton trailing axes: 4D with one time point -> 3D, 3D with one slice -> 2D."""
    while img.GetDimension() > 2 and img.GetSize()[-1] == 1:
        size = list(img.GetSize()[:-1]) + [0]
        try:
            img = sitk.Extract(img, size, [0] * img.GetDimension(),
                               sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        except RuntimeError:
            # The in-plane part of an oblique direction matrix is singular; keep spacing and origin only.
            img = sitk.Extract(img, size, [0] * img.GetDimension(), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
        d = img.GetDimension()
        direction = np.array(img.GetDirection()).reshape(d, d)
        if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-6):
            # An oblique slice's in-plane part is not a rotation: use the nearest one (polar decomposition).
            u, _, vt = np.linalg.svd(direction)
            img.SetDirection((u @ vt).ravel().tolist())
    if img.GetDimension() > 3:
        raise InputError(path, f"is {img.GetDimension()}D (size {'x'.join(map(str, img.GetSize()))}); "
                               "give one 2D or 3D image")
    if img.GetDimension() < 2:
        raise InputError(path, "is 1D; give a 2D or 3D image")
    return img


UNITS = ("as_is", "suv")  # what ``read_image(units=...)`` (and the ``data.units`` setting) accepts


def read_image(path: str | Path, units: str = "as_is") -> sitk.Image:
    """Read one image as a float32 scalar SimpleITK image, 2D or 3D.

    Any format SimpleITK reads: NIfTI, NRRD, MetaImage, PNG/JPEG/TIFF/BMP (2D; RGB is converted to grey), or a
    folder holding one DICOM series. A 3D image with a single slice is returned as 2D.

    Args:
        path: the image file or DICOM series folder.
        units: "as_is" = the stored values (a DICOM series rescaled by each slice's slope and intercept); "suv" =
            a DICOM PET series (a folder or a ``.dcm`` file) is converted to body-weight SUV (:mod:`iltm.suv`);
            any other file is taken to be in SUV already.

    Raises:
        InputError: naming ``path`` for a missing, empty, truncated or unreadable file, a vector or 4D image,
            NaN/inf voxels, or (``units="suv"``) a PET header SUV cannot be computed from.
    """
    path = Path(path)
    nonfinite = 0
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, not {units!r}")
    if not path.exists():
        raise InputError(printable(str(path)), "file not found")
    itk_name(path)
    if units == "suv" and (path.is_dir() or path.name.lower().endswith(".dcm")):
        from .suv import read_suv

        img = read_suv(path, from_cli=False)[0]
    elif path.is_dir():
        img = _read_dicom_folder(path)
    else:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InputError(path, f"cannot be accessed ({exc.strerror})") from None
        if size == 0:
            raise InputError(path, "file is empty (0 bytes)")
        if path.name.lower().endswith((".nii", ".nii.gz")):
            problem, nonfinite = _nifti_check(path)
            if problem:
                raise InputError(path, f"SimpleITK cannot read it: {problem}")
        try:
            with _quiet_itk():
                img = sitk.ReadImage(itk_name(path))
        except RuntimeError as exc:
            raise InputError(path, f"SimpleITK cannot read it: {_short_reason(exc)}") from None
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(path, "has complex-valued voxels; give a real-valued image")
    img = _to_scalar(img, path)
    img = _collapse_dims(img, path)
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(img)
    bad = max(int(values.size - np.count_nonzero(np.isfinite(values))), nonfinite)
    if bad:
        raise InputError(path, f"contains {bad} NaN/inf voxels")
    return img


def read_label(path: str | Path) -> sitk.Image:
    """Read a ground-truth mask as uint8 0/1 (any voxel > 0.5 is foreground), with the same checks as read_image."""
    img = read_image(path)
    return sitk.Cast(sitk.BinaryThreshold(img, 0.5, float("inf"), 1, 0), sitk.sitkUInt8)


def image_dims(img: sitk.Image) -> int:
    """2 or 3: the number of spatial axes."""
    return int(img.GetDimension())


def image_from_array(array: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    """A SimpleITK image from a numpy array in numpy axis order ((y, x) or (z, y, x)), with ``like``'s geometry."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    if like is not None:
        if img.GetSize() != like.GetSize():
            raise ValueError(f"array size {img.GetSize()} does not match the reference grid {like.GetSize()}")
        img.CopyInformation(like)
    return img


# ----------------------------------------------------------------------------------------------- writing


def write_image(img: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, then a rename); the format follows the suffix.

    SimpleITK does not report a short write (a full disk leaves a cut file and no error), so the temporary file is
    read back before the rename: a NIfTI file's voxel data streamed to its end, any other format read whole.

    Raises:
        InputError: naming ``path`` and the cause when the file could not be written completely.
    """
    path = Path(path)
    itk_name(path)
    with atomic_path(path, verify=lambda tmp: _image_problem(tmp, img)) as tmp:
        try:
            sitk.WriteImage(img, itk_name(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise write_error(path, problem=_short_reason(exc)) from None
    return path


def _image_problem(tmp: Path, img: sitk.Image) -> str | None:
    """Why the image file just written is not complete, or None."""
    if tmp.stat().st_size == 0:
        return "the file came out empty"
    if tmp.name.lower().endswith((".nii", ".nii.gz")):
        problem, _ = _nifti_check(tmp)
        if problem:
            return f"the file came out incomplete ({problem})"
        return None  # the header was parsed and every voxel byte is there
    try:
        with _quiet_itk():
            back = sitk.ReadImage(itk_name(tmp))
    except (RuntimeError, InputError) as exc:
        return f"the file came out unreadable ({_short_reason(exc)})"
    if tuple(back.GetSize()) != tuple(img.GetSize()):
        return f"the file came out with size {back.GetSize()} instead of {img.GetSize()}"
    return None


def png_problem(tmp: Path) -> str | None:
    """Why a PNG just written is not complete (a PNG ends with its IEND chunk), or None."""
    with open(tmp, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(tmp.stat().st_size - 12, 0))
        tail = fh.read()
    if head != b"\x89PNG\r\n\x1a\n" or b"IEND" not in tail:
        return "the PNG came out incomplete"
    return None


def itk_name(path: str | Path) -> str:
    """``path`` as the UTF-8 string SimpleITK needs; a name that is not valid UTF-8 would abort the process in
    SimpleITK's C++ (std::logic_error), so it is refused here instead.

    Raises:
        InputError: naming the path (undecodable bytes shown as \\xNN) when its name is not valid UTF-8.
    """
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(printable(name), "the file name is not valid UTF-8, which SimpleITK cannot open; "
                                          "rename it") from None
    return name


def write_png(array: np.ndarray, path: str | Path, vmin: float | None = None, vmax: float | None = None,
              cmap: str = "gray") -> Path:
    """Write a 2D array (grey, mapped through ``cmap`` between vmin and vmax, default its own range) or an RGB(A)
    array (H, W, 3|4; floats in [0, 1] or uint8) as a PNG, atomically. Row 0 is the top of the picture."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import image as mpimage

    array = np.asarray(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"write_png needs (H, W) or (H, W, 3|4), got shape {array.shape}")
    if array.ndim == 3 and array.dtype != np.uint8:
        array = np.clip(array, 0.0, 1.0)
    path = Path(path)
    with atomic_path(path, verify=png_problem) as tmp:
        if array.ndim == 2:
            mpimage.imsave(tmp, array, vmin=vmin, vmax=vmax, cmap=cmap, format="png")
        else:
            mpimage.imsave(tmp, array, format="png")
    return path


# ----------------------------------------------------------------------------------------------- cohorts


@dataclass
class ImageRecord:
    """One input scan: its id (used for output names), image path and optional ground-truth label path."""

    id: str
    image: Path
    label: Path | None = None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    try:
        name = itk_name(path)
    except InputError:
        return False  # SimpleITK cannot open it; a sub-folder is only listed when it holds a DICOM series
    with _quiet_itk():
        try:
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(name))
        except RuntimeError:
            return False


def _unique_ids(records: list[ImageRecord]) -> list[ImageRecord]:
    seen: Counter[str] = Counter()
    taken = {r.id for r in records}
    for rec in records:
        seen[rec.id] += 1
        if seen[rec.id] > 1:
            k = seen[rec.id]
            while f"{rec.id}_{k}" in taken:
                k += 1
            new = f"{rec.id}_{k}"
            taken.add(new)
            rec.id = new
    return records


def _images_in_folder(folder: Path) -> list[Path]:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if _is_image_file(p) and not p.name.lower().endswith(".dcm")]
    images += [p for p in entries if p.is_dir() and _is_dicom_folder(p)]
    has_dicom_files = any(p.is_file() and p.name.lower().endswith(".dcm") for p in entries)
    if not images and (has_dicom_files or _is_dicom_folder(folder)):
        return [folder]  # the folder itself is one DICOM series
    return sorted(images, key=lambda p: p.name)


def _find_label(labels: Path | None, image: Path) -> Path | None:
    if labels is None:
        return None
    same = labels / image.name
    if same.exists():
        return same
    want = image_id(image)
    for cand in sorted(labels.iterdir(), key=lambda p: p.name):
        if (_is_image_file(cand) or _is_dicom_folder(cand)) and image_id(cand) == want:
            return cand
    return None


def _records_from_csv(path: Path) -> list[ImageRecord]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the CSV list ({exc.__class__.__name__})") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(path, "CSV list is empty")
    header = [h.strip().lower() for h in rows[0]]
    if "image" not in header:
        raise InputError(path, f"CSV list needs a header with an 'image' column (found: {', '.join(header)})")
    col = {name: header.index(name) for name in ("image", "label", "id") if name in header}
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        cell = lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else ""  # noqa: E731
        if not cell("image"):
            raise InputError(path, f"line {line_no}: the 'image' cell is empty")
        image = (path.parent / cell("image")).resolve() if not Path(cell("image")).is_absolute() else Path(cell("image"))
        label = None
        if cell("label"):
            label = Path(cell("label"))
            label = label if label.is_absolute() else (path.parent / label).resolve()
        scan_id = cell("id") or image_id(image)
        problem = id_problem(scan_id)
        if problem:
            raise InputError(path, f"line {line_no}: {problem} (ids name the output files)")
        records.append(ImageRecord(id=scan_id, image=image, label=label))
    if not records:
        raise InputError(path, "CSV list has a header but no images")
    return records


def list_images(source: str | Path) -> list[ImageRecord]:
    """The scans named by ``source``, in a stable order, with unique ids.

    ``source`` is one of: a folder with ``images/`` (and optionally ``labels/`` holding files of the same names);
    a folder of image files and/or DICOM series sub-folders; a DICOM series folder; a CSV file with a header
    naming an ``image`` column (optional ``label`` and ``id``; relative paths are taken from the CSV's folder);
    or a single image file. Files are only listed here, not read: see :func:`check_images`.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "not found")
    if source.is_file():
        if source.name.lower().endswith(".csv"):
            return _unique_ids(_records_from_csv(source))
        problem = id_problem(image_id(source))
        if problem:
            raise InputError(printable(str(source)), f"this file name cannot name output files: {problem}; rename it")
        return [ImageRecord(id=image_id(source), image=source, label=None)]
    image_dir, label_dir = source, None
    if (source / "images").is_dir():
        image_dir = source / "images"
        label_dir = source / "labels" if (source / "labels").is_dir() else None
    images = _images_in_folder(image_dir)
    if not images:
        raise InputError(image_dir, "folder holds no images (looked for "
                                    f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} files and DICOM series)")
    records = [ImageRecord(id=image_id(p), image=p, label=_find_label(label_dir, p)) for p in images]
    for rec in records:
        problem = id_problem(rec.id)
        if problem:
            raise InputError(printable(str(rec.image)), f"this file name cannot name output files: {problem}; "
                                                          "rename it or list the scans in a CSV with an id column")
    return _unique_ids(records)


class Problem(NamedTuple):
    """Why one input cannot be used; unpacks as ``path, message``."""

    path: str
    message: str


def check_images(records: Iterable[ImageRecord], skip_unreadable: bool = False, spatial_dims: int | None = None,
                 check_labels: bool = True, units: str = "as_is") -> tuple[list[ImageRecord], list[Problem]]:
    """Read every image (and label) once and collect every problem before anything long starts.

    Nothing is raised for a bad file: the caller prints all problems at once and stops, or, with
    ``--skip-unreadable``, warns about each and carries on with the good records.

    Args:
        records: from :func:`list_images`.
        skip_unreadable: the caller's choice, accepted here for symmetry; the result is the same either way.
        spatial_dims: 2 or 3 when the model fixes it; otherwise the dimensionality most inputs have (a tie goes to
            the first readable image), and the odd ones out are problems.
        check_labels: also read each label and compare its size with its image's.
        units: how images are read (:func:`read_image`); labels are always read as they are.

    Returns:
        (good_records, problems), one ``Problem(path, message)`` per unusable record, in input order.
    """
    del skip_unreadable
    records = list(records)
    problems: dict[int, Problem] = {}
    readable: list[tuple[int, ImageRecord, int]] = []
    for k, rec in enumerate(records):
        try:
            img = read_image(rec.image, units=units)
            if check_labels and rec.label is not None:
                lab = read_image(rec.label)
                if lab.GetSize() != img.GetSize():
                    raise InputError(rec.label, f"label size {'x'.join(map(str, lab.GetSize()))} differs from its "
                                                f"image's {'x'.join(map(str, img.GetSize()))} ({rec.image})")
            readable.append((k, rec, image_dims(img)))
            del img
        except InputError as exc:
            problems[k] = Problem(exc.where, exc.problem)
    good: list[ImageRecord] = []
    if readable:
        if spatial_dims is not None:
            expected, why = int(spatial_dims), "the model is"
        else:
            counts = Counter(d for _, _, d in readable)
            expected = max(counts, key=lambda d: (counts[d], d == readable[0][2]))
            why = "most inputs are"
        for k, rec, dims in readable:
            if dims == expected:
                good.append(rec)
            else:
                problems[k] = Problem(str(rec.image), f"is {dims}D but {why} {expected}D")
    return good, [problems[k] for k in sorted(problems)]
