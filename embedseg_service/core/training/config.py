"""Training options: :class:`TrainConfig`, the selection metric, and the one path from a user's options
(a job's train spec, the command line's arguments) to a configuration (:func:`config_from_options`).

Torch-free at import, so that the service's job schemas can take their defaults from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cached_property
from numbers import Integral
from typing import Any

from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.options import Option

DEFAULT_RANDOM_CROPS = 0.25
"""Randomly placed training crops per object-centred crop (see
:class:`embedseg_service.core.data.datasets.CropDataset`)."""

OPTION_ALIASES: dict[str, str] = {"dims": "spatial_dims"}
"""Names that the HTTP API and the command line give to :class:`TrainConfig` fields."""


class SelectionMetric(Option):
    """How the best checkpoint is chosen on the validation set.

    ``mean_ap`` (default): AP_dsb averaged over the IoU thresholds of
    :func:`embedseg_service.core.metrics.default_thresholds` (0.50–0.90 in 2D, 0.1–0.9 in 3D) on whole images;
    ``ap_dsb``: AP_dsb at IoU 0.5 alone; ``oracle_iou``: the paper's oracle IoU on crops.
    """

    mean_ap = "mean_ap"
    ap_dsb = "ap_dsb"
    oracle_iou = "oracle_iou"


@dataclass(frozen=True)
class ResolvedOptions:
    """The values training uses, derived from a :class:`TrainConfig`'s fields: enums, shapes as tuples in
    array order (``crop_shape`` ``None`` for a data-derived crop), whole numbers as ``int``."""

    center: CenterMode
    selection_metric: SelectionMetric
    epochs: int
    crop_shape: tuple[int, ...] | None
    random_crops: float
    voxel_size: tuple[float, ...] | None
    min_object_size: int | None
    foreground_weight: float | None


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`embedseg_service.core.training.train.train`; every field is checked on construction.

    The fields keep the values given; the values training uses are derived from them
    (:attr:`resolved`), and :meth:`to_dict` stores those.

    ``batch_size``/``virtual_batch`` ``None`` choose batch × m
    (:func:`embedseg_service.core.training.batch.choose_batch`: 16 × 1; fewer crops for crops enlarged for
    context; for large crops a smaller batch and a larger m). ``crop_size`` is ``"auto"`` (data-derived),
    one int (every axis) or a tuple in array order, each a multiple of 8. ``max_time_minutes`` bounds the
    wall-clock time. ``samples_per_epoch`` ``None`` uses every training crop once, repeated so that an
    epoch has at least 10 optimiser steps. ``voxel_size`` (array order) overrides the files' metadata and
    sets the anisotropy. ``random_crops`` adds that many randomly placed crops per object-centred crop
    (redrawn every epoch), so the network also learns wide empty background.
    ``amp`` trains with float16 autocast on CUDA (ignored on the CPU); off by default, as on GPUs
    with TF32 tensor cores this small network trains faster in float32 than with autocast's casts.
    ``min_object_size`` and ``foreground_weight`` override the data-derived values
    (:class:`embedseg_service.core.training.hyperparams.DataProperties`); ``None`` keeps the data's.
    """

    spatial_dims: int
    epochs: int = 200
    max_time_minutes: float | None = None
    batch_size: int | None = None
    virtual_batch: int | None = None
    crop_size: str | int | Sequence[int] = "auto"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    center: CenterMode | str = CenterMode.medoid
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    selection_metric: SelectionMetric | str = SelectionMetric.mean_ap
    val_every: int = 1
    voxel_size: Sequence[float] | None = None
    in_channels: int = 1
    deterministic: bool = False
    num_workers: int = 0
    samples_per_epoch: int | None = None
    random_crops: float = DEFAULT_RANDOM_CROPS
    min_object_size: int | None = None
    foreground_weight: float | None = None

    def __post_init__(self) -> None:
        from embedseg_service.core.device import resolve_device

        _ = self.resolved  # checks every field
        resolve_device(self.device)  # refuses unknown names and CUDA without a GPU

    @cached_property
    def resolved(self) -> ResolvedOptions:
        """The values training uses (a bad field raises ``ValueError`` naming it)."""
        return _resolve(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form of the resolved values (enums as their values, tuples as lists), as stored in
        checkpoints."""
        resolved = self.resolved
        data = asdict(self)
        data.update(
            center=resolved.center.value,
            selection_metric=resolved.selection_metric.value,
            epochs=resolved.epochs,
            crop_size="auto" if resolved.crop_shape is None else list(resolved.crop_shape),
            random_crops=resolved.random_crops,
            voxel_size=None if resolved.voxel_size is None else list(resolved.voxel_size),
            min_object_size=resolved.min_object_size,
            foreground_weight=resolved.foreground_weight,
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = sorted(set(data) - set(option_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        values = dict(data)
        for key in ("crop_size", "voxel_size"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def option_names() -> tuple[str, ...]:
    """The fields of :class:`TrainConfig`, in order."""
    return tuple(f.name for f in fields(TrainConfig))


def option_default(name: str) -> Any:
    """The default of the :class:`TrainConfig` field ``name`` (or its alias, e.g. ``dims``)."""
    name = OPTION_ALIASES.get(name, name)
    for item in fields(TrainConfig):
        if item.name == name:
            if item.default is MISSING:
                raise ValueError(f"the TrainConfig field {name} has no default")
            return item.default
    raise ValueError(f"unknown TrainConfig field {name!r}")


def config_from_options(options: Mapping[str, Any], *, data_voxel_size: Sequence[float] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a user's options: a job's train spec or the command line's arguments.

    ``options`` maps :class:`TrainConfig` fields, or their aliases (:data:`OPTION_ALIASES`: ``dims`` for
    ``spatial_dims``), to values; ``None`` leaves a field at its default. Without a ``voxel_size`` option
    the data's (``data_voxel_size``, as the image files state it) is taken where it has one value per
    spatial axis. An unknown name or a bad value raises ``ValueError``.
    """
    known = set(option_names())
    values: dict[str, Any] = {}
    for name, value in options.items():
        field = OPTION_ALIASES.get(name, name)
        if field not in known:
            raise ValueError(f"unknown training option {name!r}; valid options: {', '.join(sorted(known))}")
        if field in values:
            raise ValueError(f"training option {field!r} is given twice")
        if value is not None:
            values[field] = value
    if "spatial_dims" not in values:
        raise ValueError("the training options need spatial_dims (dims): 2 or 3")
    if "voxel_size" not in values and data_voxel_size is not None:
        if len(data_voxel_size) == values["spatial_dims"]:
            values["voxel_size"] = tuple(data_voxel_size)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------- checks


def parse_shape(value: Any, spatial_dims: int, name: str) -> tuple[int, ...] | None:
    """One int per spatial axis (array order) from an int (every axis) or a sequence; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, Integral):
        values = (int(value),) * spatial_dims
    else:
        values = tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"{name} needs {spatial_dims} values (array order), got {values}")
    return values


def _resolve(config: TrainConfig) -> ResolvedOptions:
    """Check every field of ``config`` (one ``ValueError`` naming the first bad one) and derive the values
    training uses."""
    if config.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims!r}")
    center = CenterMode.parse(config.center)
    selection_metric = SelectionMetric.parse(config.selection_metric)
    if int(config.epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}")
    if config.max_time_minutes is not None and not float(config.max_time_minutes) > 0:
        raise ValueError(f"max_time_minutes must be positive, got {config.max_time_minutes}")
    for name in ("batch_size", "virtual_batch", "samples_per_epoch"):
        value = getattr(config, name)
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    crop_shape = _crop_shape(config.crop_size, config.spatial_dims)
    _check_rates(config)
    return ResolvedOptions(
        center=center,
        selection_metric=selection_metric,
        epochs=int(config.epochs),
        crop_shape=crop_shape,
        random_crops=float(config.random_crops),
        voxel_size=_voxel_size(config.voxel_size, config.spatial_dims),
        min_object_size=_min_object_size(config.min_object_size),
        foreground_weight=_foreground_weight(config.foreground_weight),
    )


def _crop_shape(crop_size: str | int | Sequence[int], spatial_dims: int) -> tuple[int, ...] | None:
    if isinstance(crop_size, str):
        if crop_size == "auto":
            return None
        try:
            crop_size = int(crop_size)
        except ValueError:
            raise ValueError(f"crop_size must be 'auto', an int or a tuple, got {crop_size!r}") from None
    shape = parse_shape(crop_size, spatial_dims, "crop_size")
    assert shape is not None
    if any(s < 8 or s % 8 for s in shape):
        raise ValueError(f"crop_size values must be positive multiples of 8, got {shape}")
    return shape


def _check_rates(config: TrainConfig) -> None:
    """Learning rate, weight decay, validation share and cadence, channels, random crops, loader workers."""
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 < float(config.val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if int(config.val_every) < 1:
        raise ValueError(f"val_every must be at least 1, got {config.val_every}")
    if int(config.in_channels) < 1:
        raise ValueError(f"in_channels must be at least 1, got {config.in_channels}")
    if not 0.0 <= float(config.random_crops) <= 10.0:
        raise ValueError(f"random_crops must be between 0 and 10 (crops per object crop), got {config.random_crops}")
    if int(config.num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {config.num_workers}")


def _voxel_size(voxel_size: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...] | None:
    if voxel_size is None:
        return None
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != spatial_dims or any(not v > 0 for v in vs):
        raise ValueError(f"voxel_size needs {spatial_dims} positive values (array order), got {vs}")
    return vs


def _min_object_size(value: int | None) -> int | None:
    if value is None:
        return None
    if int(value) < 0 or int(value) != value:
        raise ValueError(f"min_object_size must be a whole number >= 0, got {value}")
    return int(value)


def _foreground_weight(value: float | None) -> float | None:
    if value is None:
        return None
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"foreground_weight must be a positive number, got {value}")
    return float(value)
