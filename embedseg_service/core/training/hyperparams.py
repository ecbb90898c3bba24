"""Data-derived hyper-parameters (docs/method.md §8), computed in one pass over the training masks.

| parameter | rule | without objects |
| --- | --- | --- |
| ``min_object_size`` | half the pixel count of the smallest whole object (:data:`MIN_SIZE_FRACTION`) | 36 |
| ``foreground_weight`` | 2D: 10; 3D: mean over masks of #background / #foreground | 10 |
| ``object_crop_shape`` | per axis ``round_up_8(mean + 5 * std)`` of the object extents (max − min), | 256² / 32×128² |
| | Y = X = the larger, Z its own; at most the largest image (rounded up to 8); capped to | |
| | :data:`MAX_CROP_VOXELS` | |
| ``crop_shape`` | the object crop, in 2D at least :data:`MIN_CONTEXT_SIDE` per side (at most the | as above |
| | largest image); the training batch shrinks by the same area
  (:func:`embedseg_service.core.training.train.choose_batch`) | |
| ``anisotropy`` | voxel_z / voxel_x; voxel_y must equal voxel_x | 1.0 |
| ``step`` | :func:`embedseg_service.core.model.embedding.step_for` | |
| ``max_seed_radius`` | per axis ``mean + 5 * std`` of the object extents, at least 4 (clustering guard, | none |
| | see :func:`embedseg_service.core.inference.clustering.cluster`) | |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage

from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings
from embedseg_service.core.model.embedding import step_for

DEFAULT_MIN_OBJECT_SIZE = 36
MIN_SIZE_FRACTION = 0.5
"""Predicted objects smaller than this fraction of the smallest whole training object are dropped.

The smallest training object is one sample of the size distribution, not its lower end: unseen
objects a little smaller than every training object are common, while a fragment split off an
object (or a seed on background) is usually far smaller. Half the volume is about 0.8 of the
object's extent in 3D and 0.7 in 2D."""
DEFAULT_FOREGROUND_WEIGHT = 10.0
DEFAULT_CROP_SHAPE = {2: (256, 256), 3: (32, 128, 128)}
MAX_CROP_VOXELS = {2: 512 * 512, 3: 2 * 32 * 136 * 136}
"""Largest automatic crop (voxels): the crop of one sample must fit beside a batch on a GPU."""
MIN_CROP_SIDE = 8
MIN_CONTEXT_SIDE = {2: 96, 3: 0}
"""Smallest automatic training crop side in Y and X. An object-sized 2D crop of 48² is a 6 × 6 map at
the encoder's 1/8 scale, far less context than a whole image gives the same layers at prediction;
models trained on such crops sometimes put seeds with wide bandwidths on large dim, out-of-focus
regions of whole images (measured effect in ``benchmarks/RESULTS.md``). 3D keeps the object crop."""
MIN_SEED_RADIUS = 4.0
"""Smallest data-derived seed radius limit (pixels)."""
_VOXEL_RTOL = 1e-6


def max_seed_radius(
    extent_mean: Sequence[float] | None, extent_std: Sequence[float] | None, n_objects: int | None = None
) -> tuple[float, ...] | None:
    """Farthest reach (pixels per array axis) of a seed's Gaussian that clustering accepts.

    ``mean + 5 * std`` of the training objects' extents: a proposal reaching farther from its centre
    would be twice as wide as a large training object. ``None`` without extent statistics or objects.
    """
    if n_objects == 0 or not extent_mean or not extent_std or len(extent_mean) != len(extent_std):
        return None
    return tuple(max(MIN_SEED_RADIUS, float(m) + 5.0 * float(s)) for m, s in zip(extent_mean, extent_std))


def round_up_8(value: float) -> int:
    """Smallest multiple of 8 that is >= ``value`` (and >= 8)."""
    return max(8, int(math.ceil(float(value) / 8.0 - 1e-9)) * 8)


def anisotropy_from_voxel_size(voxel_size: Sequence[float] | None, spatial_dims: int) -> float:
    """voxel_z / voxel_x for a voxel size in array order; 1.0 when ``None`` or 2D.

    Raises ``ValueError`` when voxel_y differs from voxel_x (the method needs square pixels in YX).
    """
    if voxel_size is None:
        return 1.0
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != spatial_dims:
        raise ValueError(f"voxel size needs {spatial_dims} values in array order, got {vs}")
    if any(not (v > 0) or not math.isfinite(v) for v in vs):
        raise ValueError(f"voxel size values must be positive, got {vs}")
    vy, vx = vs[-2], vs[-1]
    if abs(vy - vx) > _VOXEL_RTOL * max(vy, vx):
        raise ValueError(
            f"voxel_y ({vy}) differs from voxel_x ({vx}); pixels must be square in Y and X. "
            "Resample the images so that Y and X have the same pixel size"
        )
    return vs[0] / vx if spatial_dims == 3 else 1.0


@dataclass
class DataProperties:
    """Hyper-parameters derived from label masks, stored with a model (see module docstring).

    Shapes and voxel sizes are in array order. ``extent_mean``/``extent_std`` are per axis
    (object extent = max − min index). ``overrides`` names the fields the user set.
    """

    spatial_dims: int
    min_object_size: int = DEFAULT_MIN_OBJECT_SIZE
    foreground_weight: float = DEFAULT_FOREGROUND_WEIGHT
    crop_shape: tuple[int, ...] = ()
    object_crop_shape: tuple[int, ...] = ()
    anisotropy: float = 1.0
    step: tuple[float, ...] = ()
    voxel_size: tuple[float, ...] | None = None
    normalization: NormalizationMode = NormalizationMode.percentile
    p_low: float = 1.0
    p_high: float = 99.8
    n_images: int = 0
    n_objects: int = 0
    mean_object_size: float = 0.0
    max_object_size: int = 0
    extent_mean: tuple[float, ...] = ()
    extent_std: tuple[float, ...] = ()
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        dims = self.spatial_dims
        if dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")
        self.normalization = NormalizationMode.parse(self.normalization)
        NormalizationSettings(self.normalization, self.p_low, self.p_high)  # validates percentiles
        self.crop_shape = tuple(int(s) for s in (self.crop_shape or DEFAULT_CROP_SHAPE[dims]))
        self.object_crop_shape = tuple(int(s) for s in (self.object_crop_shape or self.crop_shape))
        for name in ("crop_shape", "object_crop_shape"):
            shape = getattr(self, name)
            if len(shape) != dims or any(s < MIN_CROP_SIDE or s % 8 for s in shape):
                raise ValueError(f"{name} needs {dims} positive multiples of 8 (array order), got {shape}")
        if not (self.anisotropy > 0) or not math.isfinite(self.anisotropy):
            raise ValueError(f"anisotropy must be positive, got {self.anisotropy}")
        self.step = tuple(float(h) for h in (self.step or step_for(dims, self.anisotropy)))
        if len(self.step) != dims or any(not h > 0 for h in self.step):
            raise ValueError(f"step needs {dims} positive values (array order), got {self.step}")
        if int(self.min_object_size) < 0:
            raise ValueError(f"min_object_size must be >= 0, got {self.min_object_size}")
        self.min_object_size = int(self.min_object_size)
        if not (self.foreground_weight > 0) or not math.isfinite(self.foreground_weight):
            raise ValueError(f"foreground_weight must be positive, got {self.foreground_weight}")
        self.foreground_weight = float(self.foreground_weight)
        if self.voxel_size is not None:
            self.voxel_size = tuple(float(v) for v in self.voxel_size)
        self.extent_mean = tuple(float(v) for v in self.extent_mean)
        self.extent_std = tuple(float(v) for v in self.extent_std)
        self.overrides = tuple(self.overrides)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_masks(
        cls,
        masks: Sequence[np.ndarray],
        *,
        spatial_dims: int,
        voxel_size: Sequence[float] | None = None,
        crop_shape: Sequence[int] | int | None = None,
        min_object_size: int | None = None,
        foreground_weight: float | None = None,
        anisotropy: float | None = None,
        normalization: NormalizationMode | str = NormalizationMode.percentile,
        p_low: float = 1.0,
        p_high: float = 99.8,
        max_crop_voxels: int | None = None,
    ) -> DataProperties:
        """Compute the properties of label masks ``(*S)`` (train + val), one pass per mask.

        Keyword arguments other than ``spatial_dims``/``voxel_size``/normalisation override the
        data-derived value (and are listed in ``overrides``). ``anisotropy`` overrides the one
        from ``voxel_size``.
        """
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        masks = [np.asarray(m) for m in masks]
        stats = _MaskStatistics(spatial_dims)
        for i, mask in enumerate(masks):
            if mask.ndim != spatial_dims:
                raise ValueError(f"mask {i} has shape {mask.shape}; {spatial_dims}D masks need {spatial_dims} axes")
            if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
                raise ValueError(f"mask {i} has dtype {mask.dtype}; label masks must be integers")
            stats.add(mask)
        derived_anisotropy = anisotropy_from_voxel_size(voxel_size, spatial_dims)
        overrides: list[str] = []
        if anisotropy is not None:
            overrides.append("anisotropy")
            aniso = float(anisotropy)
        else:
            aniso = derived_anisotropy
        if min_object_size is not None:
            overrides.append("min_object_size")
        if foreground_weight is not None:
            overrides.append("foreground_weight")
        if crop_shape is not None:
            overrides.append("crop_shape")
            if isinstance(crop_shape, (int, np.integer)):
                crop_shape = (int(crop_shape),) * spatial_dims
            crop = object_crop = tuple(int(s) for s in crop_shape)
        else:
            cap = max_crop_voxels if max_crop_voxels is not None else MAX_CROP_VOXELS[spatial_dims]
            object_crop = stats.crop_shape(cap)
            crop = stats.context_crop_shape(object_crop, cap)
        return cls(
            spatial_dims=spatial_dims,
            min_object_size=min_object_size if min_object_size is not None else stats.min_object_size(),
            foreground_weight=foreground_weight if foreground_weight is not None else stats.foreground_weight(),
            crop_shape=crop,
            object_crop_shape=object_crop,
            anisotropy=aniso,
            voxel_size=tuple(float(v) for v in voxel_size) if voxel_size is not None else None,
            normalization=NormalizationMode.parse(normalization),
            p_low=p_low,
            p_high=p_high,
            n_images=len(masks),
            n_objects=stats.n_objects,
            mean_object_size=float(np.mean(stats.sizes)) if stats.n_objects else 0.0,
            max_object_size=int(max(stats.sizes)) if stats.n_objects else 0,
            extent_mean=stats.extent_mean(),
            extent_std=stats.extent_std(),
            overrides=tuple(overrides),
        )

    def with_overrides(self, **values: Any) -> DataProperties:
        """A copy with some fields replaced (validated); ``anisotropy`` also resets ``step``."""
        allowed = {"min_object_size", "foreground_weight", "crop_shape", "anisotropy", "step",
                   "normalization", "p_low", "p_high"}  # fmt: skip
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"cannot override {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        if isinstance(values.get("crop_shape"), (int, np.integer)):
            values["crop_shape"] = (int(values["crop_shape"]),) * self.spatial_dims
        if "crop_shape" in values:  # a crop the user chose is used as it is: no context enlargement
            values["object_crop_shape"] = values["crop_shape"]
        if "anisotropy" in values and "step" not in values:
            values["step"] = ()
        names = tuple(dict.fromkeys(self.overrides + tuple(k for k in values if k != "step")))
        return replace(self, overrides=names, **values)

    # ------------------------------------------------------------------ use

    @property
    def normalization_settings(self) -> NormalizationSettings:
        """The normalisation options as one object (for :func:`embedseg_service.core.data.normalization.normalize`)."""
        return NormalizationSettings(self.normalization, self.p_low, self.p_high)

    @property
    def max_seed_radius(self) -> tuple[float, ...] | None:
        """Clustering's seed radius limit for this data (:func:`max_seed_radius`)."""
        return max_seed_radius(self.extent_mean, self.extent_std, self.n_objects)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, strings), as stored in a checkpoint."""
        data = asdict(self)
        data["normalization"] = self.normalization.value
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataProperties:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown data properties: {', '.join(unknown)}")
        values = dict(data)
        for key in ("crop_shape", "object_crop_shape", "step", "voxel_size", "extent_mean", "extent_std", "overrides"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    def describe(self) -> str:
        """Multi-line summary for the user."""
        axes = "ZYX"[-self.spatial_dims :]

        def per_axis(values: Sequence[float], fmt: str = "{:.1f}") -> str:
            return ", ".join(f"{a} {fmt.format(v)}" for a, v in zip(axes, values)) if values else "n/a"

        def mark(name: str) -> str:
            return " (set by user)" if name in self.overrides else ""

        voxel = per_axis(self.voxel_size, "{:g}") if self.voxel_size else "not given"
        lines = [
            f"data: {self.n_images} mask(s), {self.n_objects} object(s), {self.spatial_dims}D",
            f"object size (pixels): min {self.min_object_size if self.n_objects else 'n/a'}, "
            f"mean {self.mean_object_size:.1f}, max {self.max_object_size}",
            f"object extent (pixels): mean {per_axis(self.extent_mean)}; std {per_axis(self.extent_std)}",
            f"crop shape: {' x '.join(str(s) for s in self.crop_shape)} ({axes}){mark('crop_shape')}"
            + (
                f"; objects need {' x '.join(str(s) for s in self.object_crop_shape)}, enlarged for context"
                if self.object_crop_shape != self.crop_shape
                else ""
            ),
            f"min object size: {self.min_object_size}{mark('min_object_size')}",
            f"foreground weight: {self.foreground_weight:.3g}{mark('foreground_weight')}",
            f"voxel size: {voxel}; anisotropy: {self.anisotropy:.4g}{mark('anisotropy')}",
            f"step (embedding units per pixel): {per_axis(self.step, '{:.6g}')}",
            f"largest seed radius (pixels): {per_axis(self.max_seed_radius or ())}",
            f"normalization: {self.normalization.value}"
            + (f" (P{self.p_low:g}-P{self.p_high:g})" if self.normalization is NormalizationMode.percentile else ""),
        ]
        return "\n".join(lines)


class _MaskStatistics:
    """Accumulates object sizes, extents and background ratios, one mask at a time."""

    def __init__(self, spatial_dims: int) -> None:
        self.dims = spatial_dims
        self.sizes: list[int] = []
        self.interior: list[bool] = []  # object not cut by the image border
        self.extents: list[np.ndarray] = []
        self.bg_fg_ratios: list[float] = []
        self.max_image_shape = np.zeros(spatial_dims, dtype=np.int64)

    @property
    def n_objects(self) -> int:
        return len(self.sizes)

    def add(self, mask: np.ndarray) -> None:
        self.max_image_shape = np.maximum(self.max_image_shape, mask.shape)
        if mask.size == 0:
            return
        mask = mask.astype(np.int32) if mask.dtype == bool else mask
        if mask.min() < 0:
            raise ValueError("label masks must be >= 0 (0 = background)")
        max_id = int(mask.max())
        if max_id == 0:
            return
        if max_id > 4 * mask.size + 1024:  # sparse huge ids: compact them first
            shape = mask.shape
            _, inverse = np.unique(mask, return_inverse=True)
            mask = inverse.reshape(shape)
        counts = np.bincount(mask.ravel())
        slices = ndimage.find_objects(mask)
        for index, slc in enumerate(slices):
            if slc is None:
                continue
            self.sizes.append(int(counts[index + 1]))
            self.interior.append(all(0 < sl.start and sl.stop < n for sl, n in zip(slc, mask.shape)))
            self.extents.append(np.array([s.stop - s.start - 1 for s in slc], dtype=np.float64))
        n_fg = int(mask.size - counts[0])
        if n_fg:
            self.bg_fg_ratios.append(float(counts[0]) / n_fg)

    def min_object_size(self) -> int:
        """:data:`MIN_SIZE_FRACTION` of the smallest object not cut by an image border (a cut
        fragment says nothing of object size; the smallest of all when every object touches a border)."""
        if not self.sizes:
            return DEFAULT_MIN_OBJECT_SIZE
        whole = [size for size, inside in zip(self.sizes, self.interior) if inside]
        return max(1, int(MIN_SIZE_FRACTION * min(whole or self.sizes)))

    def foreground_weight(self) -> float:
        if self.dims == 2 or not self.bg_fg_ratios:
            return DEFAULT_FOREGROUND_WEIGHT
        return float(np.mean(self.bg_fg_ratios))

    def extent_mean(self) -> tuple[float, ...]:
        return tuple(np.mean(self.extents, axis=0).tolist()) if self.extents else ()

    def extent_std(self) -> tuple[float, ...]:
        return tuple(np.std(self.extents, axis=0).tolist()) if self.extents else ()

    def crop_shape(self, max_voxels: int) -> tuple[int, ...]:
        dims = self.dims
        if not self.extents:
            return DEFAULT_CROP_SHAPE[dims]
        mean = np.mean(self.extents, axis=0)
        std = np.std(self.extents, axis=0)
        per_axis = [round_up_8(m + 5.0 * s) for m, s in zip(mean, std)]
        yx = max(per_axis[-2], per_axis[-1])
        yx = min(yx, round_up_8(max(self.max_image_shape[-2], self.max_image_shape[-1])))
        if dims == 2:
            while yx > MIN_CROP_SIDE and yx * yx > max_voxels:
                yx -= 8
            return (yx, yx)
        z = min(per_axis[0], round_up_8(self.max_image_shape[0]))
        while z * yx * yx > max_voxels and (z > MIN_CROP_SIDE or yx > MIN_CROP_SIDE):
            if yx >= z and yx > MIN_CROP_SIDE:
                yx -= 8
            else:
                z -= 8
        return (z, yx, yx)

    def context_crop_shape(self, object_crop: Sequence[int], max_voxels: int) -> tuple[int, ...]:
        """``object_crop`` with Y and X raised to :data:`MIN_CONTEXT_SIDE` (at most the largest image,
        rounded up to 8, and within ``max_voxels``)."""
        crop = tuple(int(s) for s in object_crop)
        largest = round_up_8(max(self.max_image_shape[-2], self.max_image_shape[-1]))
        yx = max(crop[-1], min(MIN_CONTEXT_SIDE[self.dims], largest))
        while yx > crop[-1] and int(np.prod(crop[:-2], dtype=np.int64)) * yx * yx > max_voxels:
            yx -= 8
        return crop[:-2] + (yx, yx)
