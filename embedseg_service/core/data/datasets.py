"""Training data: validation split by image, object-centred crop dataset and its collate function.

Images are ``(*S)`` or ``(C, *S)`` arrays of any real dtype, masks ``(*S)`` integer label
images (0 = background), ``S`` = (Y, X) or (Z, Y, X).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embedseg_service.core.data.augment import random_transform
from embedseg_service.core.data.centers import CenterMode, object_centers
from embedseg_service.core.data.crops import CropWindow, extract_crop, object_windows
from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings

ArrayList = list[np.ndarray]


def _check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return val_fraction


def split_train_val(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    spatial_dims: int | None = None,
) -> tuple[tuple[ArrayList, ArrayList], tuple[ArrayList, ArrayList]]:
    """Split image/mask pairs into training and validation sets, by image (never by crop).

    With two or more images, a seeded ``val_fraction`` of them (at least one, at most all but one)
    is held out; both lists keep the input order. With a single image, the image is split
    spatially along its longest spatial axis: the first part trains, the last
    ``round(val_fraction * length)`` rows (at least one) validate. The parts are views, not copies.

    Returns ``((train_images, train_masks), (val_images, val_masks))``.
    """
    val_fraction = _check_fraction(val_fraction)
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks; give one mask per image")
    if not images:
        raise ValueError("no images given: at least one image with its mask is needed")
    n = len(images)
    if n >= 2:
        rng = np.random.default_rng(seed)
        n_val = min(n - 1, max(1, int(round(val_fraction * n))))
        val = set(rng.permutation(n)[:n_val].tolist())
        train_idx = [i for i in range(n) if i not in val]
        val_idx = sorted(val)
        return (
            ([images[i] for i in train_idx], [masks[i] for i in train_idx]),
            ([images[i] for i in val_idx], [masks[i] for i in val_idx]),
        )
    image, mask = np.asarray(images[0]), np.asarray(masks[0])
    dims = spatial_dims if spatial_dims is not None else mask.ndim
    if mask.ndim != dims:
        raise ValueError(f"mask of shape {mask.shape} is not {dims}D")
    axis = int(np.argmax(mask.shape))
    length = mask.shape[axis]
    if length < 2:
        raise ValueError(f"a single image of shape {mask.shape} is too small to split into training and validation")
    n_val = min(length - 1, max(1, int(round(val_fraction * length))))
    cut = length - n_val
    offset = image.ndim - mask.ndim
    if offset not in (0, 1) or image.shape[offset:] != mask.shape:
        raise ValueError(f"image of shape {image.shape} does not match its mask of shape {mask.shape}")

    def part(array: np.ndarray, a: int, sl: slice) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[a] = sl
        return array[tuple(index)]

    return (
        ([part(image, axis + offset, slice(0, cut))], [part(mask, axis, slice(0, cut))]),
        ([part(image, axis + offset, slice(cut, None))], [part(mask, axis, slice(cut, None))]),
    )


def _settings(normalization: NormalizationSettings | NormalizationMode | str) -> NormalizationSettings:
    if isinstance(normalization, NormalizationSettings):
        return normalization
    return NormalizationSettings(NormalizationMode.parse(normalization))


class CropDataset(torch.utils.data.Dataset):
    """Object-centred training crops (one per object) and optional randomly placed crops,
    normalised once, augmented on the fly.

    Items are dicts:

    * ``image`` float32 (C, *crop), ``labels`` int64 (*crop), ``ignore`` bool (*crop)
      (True outside the image where the crop was padded by reflection, and where ``ignore`` says);
    * ``centers`` float32 (K, D): array-order pixel coordinates, inside the crop, of the centre
      (``center_mode``) of the visible part of each object; ``center_ids`` int64 (K,) their ids.

    With ``augment`` a random rot90/flip is drawn per item from ``(seed, epoch, index)`` (see
    :meth:`set_epoch`), so results do not depend on data-loader workers. ``random_fraction``
    adds, per image, that fraction of its object count (at least one) of crops placed uniformly
    at random, redrawn every epoch: object-centred crops alone never show the network a
    crop-sized stretch of empty background, and on wide empty areas an untaught network can
    answer with a spurious seed of huge bandwidth that swallows the image. Raises ``ValueError``
    when no crop can be made (no object in any mask) unless ``allow_empty``.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        crop_shape: Sequence[int],
        center_mode: CenterMode | str = CenterMode.medoid,
        anisotropy: float = 1.0,
        augment: bool = False,
        seed: int = 0,
        normalization: NormalizationSettings | NormalizationMode | str = NormalizationMode.percentile,
        ignore: Sequence[np.ndarray | None] | None = None,
        fraction: float = 1.0,
        random_fraction: float = 0.0,
        allow_empty: bool = False,
    ) -> None:
        images, masks = list(images), list(masks)
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks; give one mask per image")
        if ignore is not None and len(ignore) != len(masks):
            raise ValueError(f"{len(ignore)} ignore masks for {len(masks)} images")
        self.crop_shape = tuple(int(s) for s in crop_shape)
        self.spatial_dims = len(self.crop_shape)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"crop_shape needs 2 or 3 values (array order), got {self.crop_shape}")
        if any(s < 1 for s in self.crop_shape):
            raise ValueError(f"crop_shape values must be positive, got {self.crop_shape}")
        if not 0.0 <= random_fraction <= 10.0:
            raise ValueError(f"random_fraction must be in [0, 10], got {random_fraction}")
        self.center_mode = CenterMode.parse(center_mode)
        self.anisotropy = float(anisotropy)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.normalization = _settings(normalization)
        self.images: ArrayList = []
        self.masks: ArrayList = []
        self.ignore: list[np.ndarray | None] = []
        self.windows: list[CropWindow] = []
        self._random_images: list[int] = []
        rng = np.random.default_rng([self.seed, 1])
        channels: int | None = None
        dims = self.spatial_dims
        for i, (image, mask) in enumerate(zip(images, masks)):
            image, mask = np.asarray(image), np.asarray(mask)
            given_shape = image.shape
            if mask.ndim != dims:
                raise ValueError(f"mask {i} has shape {mask.shape}; crops of shape {self.crop_shape} need {dims}D")
            if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
                raise ValueError(f"mask {i} has dtype {mask.dtype}; label masks must be integers")
            if image.ndim == dims:
                image = image[None]
            if image.ndim != dims + 1 or image.shape[1:] != mask.shape:
                raise ValueError(f"image {i} has shape {given_shape} but its mask has shape {mask.shape}")
            if channels is not None and image.shape[0] != channels:
                raise ValueError(f"image {i} has {image.shape[0]} channels, the first image {channels}")
            channels = image.shape[0]
            if mask.size and mask.min() < 0:
                raise ValueError(f"mask {i} has negative labels; labels must be >= 0 (0 = background)")
            ign = None
            if ignore is not None and ignore[i] is not None:
                ign = np.asarray(ignore[i], dtype=bool)
                if ign.shape != mask.shape:
                    raise ValueError(f"ignore mask {i} has shape {ign.shape}, its mask {mask.shape}")
            self.images.append(self.normalization.apply(image, channel_axis=0))
            self.masks.append(mask)
            self.ignore.append(ign)
            windows = object_windows(mask, self.crop_shape, image_index=i, fraction=fraction, rng=rng)
            self.windows.extend(windows)
            if random_fraction > 0 and windows:
                self._random_images.extend([i] * max(1, int(math.ceil(random_fraction * len(windows)))))
        if not self.windows and not allow_empty:
            if not masks:
                raise ValueError("no images given: nothing to make training crops from")
            raise ValueError(
                f"no crops can be made: the {len(masks)} mask(s) hold no object (every pixel is 0); "
                "give masks with labelled objects (one integer id per object)"
            )
        self.in_channels = channels or 1
        self._centers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._whole: dict[int, tuple[dict[int, np.ndarray], dict[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.windows) + len(self._random_images)

    @property
    def n_object_crops(self) -> int:
        """Number of object-centred crops (the first items; randomly placed crops follow)."""
        return len(self.windows)

    def window(self, index: int) -> CropWindow:
        """Window of item ``index``: its object's, or a random position drawn from ``(seed, epoch, index)``."""
        if index < len(self.windows):
            return self.windows[index]
        i = self._random_images[index - len(self.windows)]
        shape = self.masks[i].shape
        rng = np.random.default_rng([self.seed, self.epoch, index, 2])
        start = tuple(
            int(rng.integers(0, n - c + 1)) if n >= c else -((c - n) // 2) for n, c in zip(shape, self.crop_shape)
        )
        return CropWindow(i, start, self.crop_shape)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of epoch ``epoch``."""
        self.epoch = int(epoch)

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Non-augmented crop ``index``: image, labels, ignore, center ids, centres (numpy)."""
        window = self.window(index)
        i = window.image_index
        image, labels, ignore = extract_crop(self.images[i], self.masks[i], window, self.ignore[i])
        if index >= len(self.windows):
            ids, centers = self._crop_centers(i, labels, window.start)
            return image, labels, ignore, ids, centers
        if index not in self._centers:
            self._centers[index] = self._crop_centers(i, labels, window.start)
        ids, centers = self._centers[index]
        return image, labels, ignore, ids, centers

    def _image_centers(self, i: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
        """Centres and sizes of every whole object of image ``i`` (computed once)."""
        if i not in self._whole:
            mask = self.masks[i]
            ids, centers = object_centers(mask, self.center_mode, self.anisotropy)
            values, counts = np.unique(mask[mask != 0], return_counts=True)
            sizes = dict(zip(values.tolist(), counts.tolist()))
            self._whole[i] = ({int(k): c for k, c in zip(ids, centers)}, sizes)
        return self._whole[i]

    def _crop_centers(self, i: int, labels: np.ndarray, start: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and centres of the visible part of every object in a crop of image ``i`` at ``start``.

        A wholly visible object keeps its whole-image medoid (the same pixels, shifted); only
        objects cut by the crop are recomputed.
        """
        if self.center_mode is CenterMode.centroid:
            return object_centers(labels, self.center_mode, self.anisotropy)
        whole, sizes = self._image_centers(i)
        ids, counts = np.unique(labels[labels != 0], return_counts=True)
        cut = [k for k, n in zip(ids.tolist(), counts.tolist()) if sizes.get(k) != n]
        cut_centers: dict[int, np.ndarray] = {}
        if cut:
            only_cut = np.where(np.isin(labels, cut), labels, 0)
            cut_ids, cut_c = object_centers(only_cut, self.center_mode, self.anisotropy)
            cut_centers = {int(k): c for k, c in zip(cut_ids, cut_c)}
        offset = np.asarray(start, dtype=np.float64)
        centers = [cut_centers[k] if k in cut_centers else whole[k] - offset for k in ids.tolist()]
        dims = labels.ndim
        out = np.stack(centers) if centers else np.zeros((0, dims), dtype=np.float64)
        return ids.astype(np.int64), out

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"crop index {index} out of range for {len(self)} crops")
        index %= len(self)
        image, labels, ignore, ids, centers = self.crop(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            square = self.crop_shape[-1] == self.crop_shape[-2]
            t = random_transform(rng, self.spatial_dims, square=square)
            dims = self.spatial_dims
            centers = t.apply_points(centers, labels.shape)
            image, labels, ignore = t.apply(image, dims), t.apply(labels, dims), t.apply(ignore, dims)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "ignore": torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool)),
            "centers": torch.from_numpy(np.asarray(centers, dtype=np.float32).reshape(-1, self.spatial_dims)),
            "center_ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)),
        }


def collate_crops(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image`` (B, C, *crop), ``labels`` (B, *crop), ``ignore`` (B, *crop); keep
    ``centers``/``center_ids`` as lists of (K_b, D) / (K_b,) tensors."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "labels": torch.stack([b["labels"] for b in batch]),
        "ignore": torch.stack([b["ignore"] for b in batch]),
        "centers": [b["centers"] for b in batch],
        "center_ids": [b["center_ids"] for b in batch],
    }
