"""From a scan on its own grid to the network's array, and from an output map back onto the scan's grid.

``Preprocessor.forward`` resamples (optional), normalises intensities and crops/pads; ``GeometryInfo`` records every
step so that ``Preprocessor.inverse`` puts a score or mask map back on exactly the input's size, spacing, origin
and direction. Arrays are in numpy axis order ((y, x) or (z, y, x)); sizes, spacings and offsets in the info are
in SimpleITK order (x, y(, z)), as in ``DataConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .config import DataConfig
from .errors import InputError

INTENSITY_MODES = ("pet", "unit8bit", "8bit", "none")

# Elastic deformation of the 3D augmentation: smoothing (voxels) and magnitude of the random offset field. With
# these the displacement is up to about two voxels, the size of anatomical variation between subjects at PET
# resolution.
ELASTIC_SIGMA_RANGE = (5.0, 7.0)
ELASTIC_MAGNITUDE_RANGE = (40.0, 120.0)


@dataclass
class GeometryInfo:
    """Everything needed to undo ``Preprocessor.forward``; JSON-serialisable through ``to_dict``/``from_dict``.

    Args:
        dims: 2 or 3.
        input_size, input_spacing, input_origin, input_direction: the scan's own grid (x-y(-z) order;
            direction row-major, dims x dims).
        resampled: whether the scan was resampled to ``grid_spacing``.
        grid_size, grid_spacing, grid_origin: the grid after resampling (same direction as the input);
            equal to the input grid when not resampled.
        offset: per axis, network voxel i lies on grid voxel i + offset (negative: padding, positive: cropping).
        spatial_size: the network array's size (x-y(-z) order).
        intensity: normalisation mode; ``intensity_low``/``intensity_high`` are the clip bounds used
            (``None`` when the mode does not clip), ``intensity_scale`` the divisor applied after clipping.
    """

    dims: int
    input_size: list[int]
    input_spacing: list[float]
    input_origin: list[float]
    input_direction: list[float]
    resampled: bool
    grid_size: list[int]
    grid_spacing: list[float]
    grid_origin: list[float]
    offset: list[int]
    spatial_size: list[int]
    intensity: str = "none"
    intensity_low: float | None = None
    intensity_high: float | None = None
    intensity_scale: float = 1.0

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the network array without its channel axis, numpy order."""
        return tuple(reversed(self.spatial_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GeometryInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def input_reference(self) -> sitk.Image:
        """An empty image on the input grid (for resampling onto it)."""
        ref = sitk.Image([int(s) for s in self.input_size], sitk.sitkFloat32)
        ref.SetSpacing(self.input_spacing)
        ref.SetOrigin(self.input_origin)
        ref.SetDirection(self.input_direction)
        return ref


def _per_axis(value: Any, dims: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * dims
    if len(values) != dims:
        raise InputError(f"data.{name}", f"has {len(values)} values but the image is {dims}D")
    return [float(v) for v in values]


def _crop_or_pad(array: np.ndarray, offset_np: Sequence[int], out_shape: Sequence[int], fill: float) -> np.ndarray:
    """out[i] = array[i + offset] where that exists, else ``fill`` (all in numpy order)."""
    out = np.full(tuple(out_shape), fill, dtype=array.dtype)
    src, dst = [], []
    for off, n_in, n_out in zip(offset_np, array.shape, out_shape):
        lo, hi = max(0, off), min(n_in, off + n_out)
        src.append(slice(lo, hi))
        dst.append(slice(lo - off, hi - off))
    out[tuple(dst)] = array[tuple(src)]
    return out


class Augmentation:
    """MONAI random transforms on one (C, *spatial) tensor; returns a plain tensor (no MONAI metadata)."""

    def __init__(self, transforms: list):
        from monai.transforms import Compose

        self.compose = Compose(transforms)

    def set_random_state(self, seed: int | None = None) -> "Augmentation":
        self.compose.set_random_state(seed=seed)
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.compose(image)
        return out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)


class Preprocessor:
    """Scan -> network array and back, as configured by ``DataConfig``.

    Args:
        data_cfg: resampling, intensity and size settings.
        downsample_factor: the VQ-VAE's total downsampling (2 ** number of downsamplings); every array axis is a
            multiple of it.
    """

    def __init__(self, data_cfg: DataConfig, downsample_factor: int):
        self.cfg = data_cfg
        self.factor = int(downsample_factor)
        if self.factor < 1:
            raise ValueError("downsample_factor must be >= 1")
        if data_cfg.intensity not in INTENSITY_MODES:
            raise InputError("data.intensity", f"unknown mode '{data_cfg.intensity}' (choose from "
                                               f"{', '.join(INTENSITY_MODES)})")
        if data_cfg.spatial_size is not None:
            bad = [s for s in data_cfg.spatial_size if int(s) < self.factor or int(s) % self.factor]
            if bad:
                raise InputError("data.spatial_size", f"{list(data_cfg.spatial_size)} must be positive multiples of "
                                                      f"the downsampling factor {self.factor}")
        if data_cfg.target_spacing is not None:
            spacing = data_cfg.target_spacing if isinstance(data_cfg.target_spacing, (list, tuple)) \
                else [data_cfg.target_spacing]
            if any(float(s) <= 0 for s in spacing):
                raise InputError("data.target_spacing", f"{data_cfg.target_spacing} must be positive")

    # -------------------------------------------------------------------------------------------- forward

    def _resample(self, img: sitk.Image) -> tuple[sitk.Image, bool]:
        dims = img.GetDimension()
        if self.cfg.target_spacing is None:
            return img, False
        target = _per_axis(self.cfg.target_spacing, dims, "target_spacing")
        spacing = list(img.GetSpacing())
        if np.allclose(target, spacing, rtol=1e-6, atol=0):
            return img, False
        size = list(img.GetSize())
        extent = [n * s for n, s in zip(size, spacing)]
        # Enough voxels to cover the whole scan (never fewer, so no edge voxel of the input is lost), centred on it.
        new_size = [max(1, math.ceil(e / t - 1e-6)) for e, t in zip(extent, target)]
        shift = [-0.5 * s + 0.5 * t + 0.5 * (e - n * t) for s, t, e, n in zip(spacing, target, extent, new_size)]
        direction = np.array(img.GetDirection()).reshape(dims, dims)
        origin = np.array(img.GetOrigin()) + direction @ np.array(shift)
        out = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), target,
                            img.GetDirection(), 0.0, sitk.sitkFloat32)
        return out, True

    def _normalise(self, array: np.ndarray, scan_values: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        mode = self.cfg.intensity
        if mode == "pet":
            if self.cfg.clip_value is not None:
                high = float(self.cfg.clip_value)
            else:
                high = float(np.percentile(scan_values, float(self.cfg.clip_percentile)))
            scale = high if high > 0 else 1.0  # an all-zero scan stays zero rather than dividing by zero
            out = np.clip(array, 0.0, high) / scale
            return out, dict(intensity_low=0.0, intensity_high=high, intensity_scale=scale)
        if mode == "unit8bit":
            return np.clip(array / 255.0, 0.0, 1.0), dict(intensity_low=0.0, intensity_high=255.0,
                                                          intensity_scale=255.0)
        if mode == "8bit":
            return np.clip(array, 0.0, 255.0), dict(intensity_low=0.0, intensity_high=255.0, intensity_scale=1.0)
        return array, dict(intensity_low=None, intensity_high=None, intensity_scale=1.0)

    def output_size(self, grid_size: Sequence[int]) -> list[int]:
        """The network array size (x-y(-z)) for a grid of ``grid_size``."""
        if self.cfg.spatial_size is not None:
            return [int(s) for s in self.cfg.spatial_size]
        return [int(math.ceil(n / self.factor) * self.factor) for n in grid_size]

    def forward(self, img: sitk.Image, where: str = "image") -> tuple[np.ndarray, GeometryInfo]:
        """Turn a scan into the network's input.

        Args:
            img: scalar 2D or 3D image (as from ``iltm.io.read_image``).
            where: the scan's name or path, for error messages.

        Returns:
            (array, info): float32 array of shape (1, *spatial) in numpy order, and the geometry to undo it.

        Raises:
            InputError: the scan has the wrong dimensionality for the model or is too small for the downsampling.
        """
        dims = img.GetDimension()
        if self.cfg.spatial_dims is not None and dims != int(self.cfg.spatial_dims):
            raise InputError(where, f"is {dims}D but the model is {int(self.cfg.spatial_dims)}D")
        if self.cfg.spatial_size is not None and len(self.cfg.spatial_size) != dims:
            raise InputError(where, f"is {dims}D but data.spatial_size {list(self.cfg.spatial_size)} is "
                                    f"{len(self.cfg.spatial_size)}D")
        if img.GetPixelID() != sitk.sitkFloat32:
            img = sitk.Cast(img, sitk.sitkFloat32)
        grid, resampled = self._resample(img)
        grid_size = list(grid.GetSize())
        if min(grid_size) < self.factor:
            levels = int(round(math.log2(self.factor)))
            after = f" after resampling to {list(grid.GetSpacing())} mm" if resampled else ""
            raise InputError(where, f"is too small for {levels} downsamplings: needs at least {self.factor} voxels "
                                    f"per axis, has {'x'.join(map(str, grid_size))}{after}")
        array, intensity = self._normalise(sitk.GetArrayFromImage(grid), sitk.GetArrayViewFromImage(img))
        spatial_size = self.output_size(grid_size)
        offset = [(g - s) // 2 for g, s in zip(grid_size, spatial_size)]
        array = _crop_or_pad(array.astype(np.float32, copy=False), offset[::-1], spatial_size[::-1], 0.0)
        info = GeometryInfo(
            dims=dims,
            input_size=list(img.GetSize()), input_spacing=list(img.GetSpacing()),
            input_origin=list(img.GetOrigin()), input_direction=list(img.GetDirection()),
            resampled=resampled,
            grid_size=grid_size, grid_spacing=list(grid.GetSpacing()), grid_origin=list(grid.GetOrigin()),
            offset=offset, spatial_size=spatial_size, intensity=self.cfg.intensity, **intensity,
        )
        return array[None], info

    # -------------------------------------------------------------------------------------------- inverse

    def inverse(self, array: np.ndarray, info: GeometryInfo, interpolator: str = "linear",
                fill: float = 0.0) -> sitk.Image:
        """Put a map computed on the network grid back on the scan's own grid.

        Args:
            array: (*spatial) or (1, *spatial), numpy order, the shape ``forward`` produced.
            info: from ``forward`` (or ``GeometryInfo.from_dict``).
            interpolator: ``"linear"`` for scores, ``"nearest"`` for masks.
            fill: value for input voxels the network array did not cover (cropped away).

        Returns:
            float32 image with exactly the input's size, spacing, origin and direction.
        """
        if isinstance(info, dict):
            info = GeometryInfo.from_dict(info)
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == info.dims + 1 and array.shape[0] == 1:
            array = array[0]
        if tuple(array.shape) != info.array_shape:
            raise ValueError(f"array shape {array.shape} is not the preprocessed shape {info.array_shape}")
        interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}.get(interpolator)
        if interp is None:
            raise ValueError(f"interpolator must be 'linear' or 'nearest', not {interpolator!r}")
        grid_array = _crop_or_pad(array, [-o for o in info.offset[::-1]], info.grid_size[::-1], float(fill))
        grid = sitk.GetImageFromArray(grid_array)
        grid.SetSpacing(info.grid_spacing)
        grid.SetOrigin(info.grid_origin)
        grid.SetDirection(info.input_direction)
        if not info.resampled:
            return grid
        return sitk.Resample(grid, info.input_reference(), sitk.Transform(), interp, float(fill), sitk.sitkFloat32)

    # -------------------------------------------------------------------------------------------- augmentation

    def augmentation(self, spatial_dims: int | None = None, seed: int | None = None) -> Augmentation:
        """The training augmentation for this configuration; see :func:`augmentation`."""
        return augmentation(self.cfg, spatial_dims, seed)


def augmentation(data_cfg: DataConfig, spatial_dims: int | None = None, seed: int | None = None) -> Augmentation:
    """The paper's training augmentation as MONAI transforms on (C, *spatial) tensors.

    A random affine (rotation up to ``rotate_degrees`` about each axis, scaling by up to ``scale_range``,
    translation up to ``translate_voxels``) with probability ``augment_prob``; in 3D, when ``elastic_3d``, also an
    elastic deformation with the same probability. Identity when ``augment`` is off. Reproducible with ``seed`` (or
    the returned object's ``set_random_state(seed)``).

    Args:
        data_cfg: the augmentation settings.
        spatial_dims: 2 or 3; defaults to ``data_cfg.spatial_dims``.
        seed: seeds MONAI's random state.
    """
    from monai.transforms import Rand3DElastic, RandAffine

    dims = int(spatial_dims or data_cfg.spatial_dims or 0)
    if dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
    transforms: list = []
    if data_cfg.augment:
        angle = math.radians(float(data_cfg.rotate_degrees))
        transforms.append(RandAffine(
            prob=float(data_cfg.augment_prob),
            rotate_range=(angle,) if dims == 2 else (angle, angle, angle),
            scale_range=(float(data_cfg.scale_range),) * dims,
            translate_range=(float(data_cfg.translate_voxels),) * dims,
            mode="bilinear", padding_mode="zeros",
        ))
        if dims == 3 and data_cfg.elastic_3d:
            transforms.append(Rand3DElastic(
                sigma_range=ELASTIC_SIGMA_RANGE, magnitude_range=ELASTIC_MAGNITUDE_RANGE,
                prob=float(data_cfg.augment_prob), mode="bilinear", padding_mode="zeros",
            ))
    aug = Augmentation(transforms)
    if seed is not None:
        aug.set_random_state(seed)
    return aug
