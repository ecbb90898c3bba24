"""The inputs of a training run: checked image/mask pairs, the held-out validation part, the data-derived
parameters, the training crops and the validator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedseg_service.core.training.config import TrainConfig
from embedseg_service.core.training.validation import Validator

if TYPE_CHECKING:
    from embedseg_service.core.data.datasets import CropDataset
    from embedseg_service.core.training.hyperparams import DataProperties

MAX_VAL_CROPS = 48
"""Validation crops kept (a seeded subset when there are more)."""

Pairs = tuple[list[np.ndarray], list[np.ndarray]]
"""Images and their label masks."""


def _as_array_list(items: Sequence[np.ndarray] | np.ndarray, name: str) -> list[np.ndarray]:
    if isinstance(items, np.ndarray):
        items = [items]
    out = [np.asarray(a) for a in items]
    if not out:
        raise ValueError(f"{name} is empty: give at least one image")
    return out


def _check_pairs(
    images: list[np.ndarray], masks: list[np.ndarray], spatial_dims: int, in_channels: int, what: str
) -> None:
    if len(images) != len(masks):
        raise ValueError(f"{what}: {len(images)} images but {len(masks)} masks; give one mask per image")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if mask.ndim != spatial_dims:
            raise ValueError(
                f"{what} mask {i} has shape {mask.shape}; a {spatial_dims}D mask needs {spatial_dims} axes"
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            raise ValueError(f"{what} mask {i} has dtype {mask.dtype}; label masks must be integers")
        spatial = image.shape if image.ndim == spatial_dims else image.shape[1:]
        if image.ndim not in (spatial_dims, spatial_dims + 1) or tuple(spatial) != tuple(mask.shape):
            raise ValueError(
                f"{what} image {i} has shape {image.shape} but its mask has shape {mask.shape}; "
                f"images are {'(Z, Y, X)' if spatial_dims == 3 else '(Y, X)'} with an optional channel axis first"
            )
        channels = 1 if image.ndim == spatial_dims else image.shape[0]
        if channels != in_channels:
            raise ValueError(f"{what} image {i} has {channels} channel(s); the model is built for {in_channels}")


def training_pairs(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    val_images: Sequence[np.ndarray] | None,
    val_masks: Sequence[np.ndarray] | None,
    config: TrainConfig,
) -> tuple[Pairs, Pairs]:
    """Checked training and validation pairs: the given validation pairs, or a seeded held-out part."""
    dims = config.spatial_dims
    images_l = _as_array_list(images, "images")
    masks_l = _as_array_list(masks, "masks")
    _check_pairs(images_l, masks_l, dims, config.in_channels, "training")
    if (val_images is None) != (val_masks is None):
        raise ValueError("give both val_images and val_masks, or neither (then val_fraction is held out)")
    if val_images is not None:
        assert val_masks is not None
        val_images_l = _as_array_list(val_images, "val_images")
        val_masks_l = _as_array_list(val_masks, "val_masks")
        _check_pairs(val_images_l, val_masks_l, dims, config.in_channels, "validation")
        return (images_l, masks_l), (val_images_l, val_masks_l)
    from embedseg_service.core.data.datasets import split_train_val

    (train_images, train_masks), (val_images_l, val_masks_l) = split_train_val(
        images_l, masks_l, val_fraction=config.val_fraction, seed=config.seed, spatial_dims=dims
    )
    return (train_images, train_masks), (val_images_l, val_masks_l)


def resolve_voxel_size(voxel_size: Sequence[float] | None, config: TrainConfig) -> tuple[float, ...] | None:
    """``voxel_size`` (array order) if given, else the configuration's; checked against the dimensionality."""
    vs = voxel_size if voxel_size is not None else config.resolved.voxel_size
    if vs is None:
        return None
    vs = tuple(float(v) for v in vs)
    if len(vs) != config.spatial_dims or any(not v > 0 for v in vs):
        raise ValueError(f"voxel_size needs {config.spatial_dims} positive values (array order), got {vs}")
    return vs


def check_resume(data: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a checkpoint of another dimensionality or channel count, or one without optimiser state."""
    if int(data["spatial_dims"]) != config.spatial_dims:
        raise ValueError(
            f"cannot resume a {data['spatial_dims']}D checkpoint with a {config.spatial_dims}D configuration"
        )
    if int(data["in_channels"]) != config.in_channels:
        raise ValueError(
            f"cannot resume a checkpoint for {data['in_channels']} input channel(s) "
            f"with in_channels={config.in_channels}"
        )
    if not data.get("optimizer"):
        raise ValueError("this checkpoint holds no optimiser state; resume from the '.last' file of a run")


def data_properties(
    resume: dict[str, Any] | None,
    masks: list[np.ndarray],
    config: TrainConfig,
    voxel_size: tuple[float, ...] | None,
) -> DataProperties:
    """Data-derived parameters of all ``masks`` (a resumed run keeps the ones it was started with)."""
    from embedseg_service.core.training.hyperparams import DataProperties

    if resume is not None and resume.get("properties"):
        return DataProperties.from_dict(resume["properties"])
    resolved = config.resolved
    return DataProperties.from_masks(
        masks,
        spatial_dims=config.spatial_dims,
        voxel_size=voxel_size,
        crop_shape=resolved.crop_shape,
        min_object_size=resolved.min_object_size,
        foreground_weight=resolved.foreground_weight,
    )


def datasets(
    train_pairs: Pairs,
    val_pairs: Pairs,
    props: DataProperties,
    config: TrainConfig,
    *,
    crop_shape: tuple[int, ...],
    step: tuple[float, ...],
    batch: int,
    device: torch.device,
) -> tuple[CropDataset, Validator]:
    """The training crops and the validator: fixed validation crops (a seeded subset) and whole images."""
    from embedseg_service.core.data.datasets import CropDataset

    center = config.resolved.center
    train_set = CropDataset(
        train_pairs[0],
        train_pairs[1],
        crop_shape=crop_shape,
        center_mode=center,
        anisotropy=props.anisotropy,
        augment=True,
        seed=config.seed,
        normalization=props.normalization,
        random_fraction=config.resolved.random_crops,
    )
    if len(train_set) == 0:
        raise ValueError("the training masks hold no object: nothing to train on")
    val_images, val_masks = val_pairs
    val_set = CropDataset(
        val_images,
        val_masks,
        crop_shape=crop_shape,
        center_mode=center,
        anisotropy=props.anisotropy,
        augment=False,
        seed=config.seed,
        normalization=props.normalization,
        allow_empty=True,
    )
    val_index = np.arange(len(val_set))
    if len(val_index) > MAX_VAL_CROPS:
        val_index = np.sort(np.random.default_rng([config.seed, 7]).choice(val_index, MAX_VAL_CROPS, replace=False))
    val_crops = [val_set[int(i)] for i in val_index]
    val_norm = [normalized(image, props, config.spatial_dims) for image in val_images]
    validator = Validator(
        val_crops,
        val_norm,
        [np.asarray(mk) for mk in val_masks],
        step=step,
        min_size=int(props.min_object_size),
        max_radius=props.max_seed_radius,
        tile="auto",
        batch_size=batch,
        device=device,
    )
    return train_set, validator


def normalized(image: np.ndarray, props: DataProperties, dims: int) -> np.ndarray:
    """``(C, *S)`` float32 image normalised as the training crops are."""
    image = np.asarray(image)
    if image.ndim == dims:
        image = image[None]
    return props.normalization_settings.apply(image, channel_axis=0).astype(np.float32, copy=False)
