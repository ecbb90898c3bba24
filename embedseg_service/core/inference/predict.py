"""Prediction: raw network outputs for a whole image or volume, and instance labels (docs/method.md §7, §11.3).

:func:`predict_raw` runs the network in eval mode without gradients, block by block with the
outputs of the whole image (:mod:`embedseg_service.core.inference.tiling`), optionally with test-time augmentation
(:mod:`embedseg_service.core.inference.tta`), and returns the raw outputs on the CPU. :func:`segment` clusters them
into int32 labels with :func:`embedseg_service.core.inference.clustering.cluster`.

:func:`segment_batch` does the same for many images: images of one shape run through the network
together, as many at once as :func:`images_per_batch` allows, and each is clustered on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.defaults import DEFAULT_PRECISION, InferencePrecision
from embedseg_service.core.inference.padding import round_up
from embedseg_service.core.inference.tiling import Progress, predict_tiled_batch
from embedseg_service.core.inference.tta import DEFAULT_BATCH as TTA_BATCH
from embedseg_service.core.inference.tta import TTACombine

Normalization = Callable[[np.ndarray], np.ndarray] | Mapping[str, Any] | str | None
"""``None``: the image is already normalised (float); a callable applied to each channel ``(*S)``;
a mode name or keyword arguments for :func:`embedseg_service.core.data.normalization.normalize`; or an object with
``apply(image, channel_axis)`` (e.g. ``embedseg_service.core.data.normalization.NormalizationSettings``)."""


def _model_dims(model: torch.nn.Module) -> tuple[int, int]:
    dims = getattr(model, "spatial_dims", None)
    channels = getattr(model, "in_channels", 1)
    if dims not in (2, 3):
        raise ValueError("model must have a spatial_dims attribute of 2 or 3 (e.g. core.model.erfnet.BranchedERFNet)")
    return int(dims), int(channels)


def prepare_image(
    image: np.ndarray | torch.Tensor,
    spatial_dims: int,
    in_channels: int = 1,
    normalization: Normalization = None,
) -> np.ndarray:
    """Return ``image`` as float32 ``(C, *S)``: adds the channel axis of ``(*S)`` input and normalises.

    ``image`` is ``(Y, X)`` / ``(Z, Y, X)`` or has a leading channel axis of ``in_channels``.
    Without ``normalization`` an integer image is refused (it would reach the network unscaled).
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == spatial_dims:
        array = array[np.newaxis]
    elif array.ndim != spatial_dims + 1:
        axes = "(Y, X)" if spatial_dims == 2 else "(Z, Y, X)"
        raise ValueError(
            f"image must be {axes} or have a leading channel axis for a {spatial_dims}D model, got shape {array.shape}"
        )
    if array.shape[0] != in_channels:
        raise ValueError(f"the model expects {in_channels} channel(s) (axis 0), got an image of shape {array.shape}")
    if any(s < 1 for s in array.shape[1:]):
        raise ValueError(f"image has an empty axis: shape {array.shape}")
    if normalization is None:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"image of dtype {array.dtype} is not normalised; pass normalization "
                "(e.g. 'percentile') or a float image already normalised"
            )
        return np.ascontiguousarray(array, dtype=np.float32)
    if callable(normalization):
        out = np.stack([np.asarray(normalization(array[c]), dtype=np.float32) for c in range(array.shape[0])])
    elif hasattr(normalization, "apply"):
        out = normalization.apply(array, channel_axis=0)
    else:
        from embedseg_service.core.data.normalization import normalize

        kwargs = {"mode": normalization} if isinstance(normalization, str) else dict(normalization)
        out = normalize(array, channel_axis=0, **kwargs)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if out.shape != array.shape:
        raise ValueError(f"normalization changed the image shape from {array.shape} to {out.shape}")
    return out


BATCH_VOXELS = {"cpu": 1 << 16, "cuda": 1 << 22}
"""Most voxels (images x padded voxels) of one batch of images run together, per device type. On the CPU
batches of small images are faster per image and batches of more voxels than this slower
(``benchmarks/RESULTS.md``); on a GPU the tile choice bounds the memory of a batch
(:func:`embedseg_service.core.inference.tile_size.auto_tile_shape`)."""


def _network_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """Where the network runs: ``device`` (the model is moved there) or where its parameters are."""
    params = next(model.parameters(), None)
    if device is None:
        return params.device if params is not None else resolve_device("auto")
    dev = resolve_device(device)
    if params is not None and params.device != dev:
        model.to(dev)
    return dev


def _run_network(
    model: torch.nn.Module, prepared: np.ndarray, dev: torch.device, options: dict[str, Any]
) -> np.ndarray:
    """Raw outputs ``(B, C_out, *S)`` of prepared images ``(B, C, *S)`` in eval mode without gradients (modules
    in training mode go back to it afterwards); ``options`` go to
    :func:`embedseg_service.core.inference.tiling.predict_tiled_batch`."""
    training = [module for module in model.modules() if module.training]
    if training:  # switching modes walks every module: only when needed
        model.eval()
    try:
        with torch.inference_mode():
            return predict_tiled_batch(model, prepared, device=dev, **options)
    finally:
        for module in training:
            module.training = True


def _tiling_options(
    tta: bool, tile: Sequence[int] | str | None, combine: TTACombine | str, fg_thresh: float, tta_batch_size: int,
    precision: InferencePrecision | str, progress: Progress | None,
) -> dict[str, Any]:  # fmt: skip
    return {"tile": tile, "tta": tta, "precision": precision, "progress": progress,
            "tta_options": {"combine": combine, "fg_thresh": fg_thresh, "batch_size": tta_batch_size}}  # fmt: skip


def predict_raw(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    tta: bool = False,
    tile: Sequence[int] | str | None = "auto",
    normalization: Normalization = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    combine: TTACombine | str = TTACombine.median,
    fg_thresh: float = 0.5,
    tta_batch_size: int = TTA_BATCH,
    progress: Progress | None = None,
) -> np.ndarray:
    """Raw network outputs ``(2*D + 1, *S)`` float32 (numpy, CPU) for ``image``.

    ``image``: ``(Y, X)`` / ``(Z, Y, X)``, optionally with a leading channel axis; float and already
    normalised unless ``normalization`` is given (see :data:`Normalization`). ``device``: where the
    network runs (default: where the model's parameters are; the model is moved there otherwise).
    ``tile``: block shape in array order, ``"auto"`` (from free device memory) or ``None`` (whole
    image); it bounds memory only, the outputs are the whole image's (:mod:`embedseg_service.core.inference.tiling`).
    ``tta`` combines the 8 / 16 transforms (``combine``, ``fg_thresh`` and ``tta_batch_size`` as in
    :func:`embedseg_service.core.inference.tta.predict_tta`). ``precision``: the network's number format
    (:func:`embedseg_service.core.inference.tiling.autocast_dtype`). ``progress(done,
    total)`` is called per block; returning ``False`` raises
    :class:`embedseg_service.core.inference.tiling.PredictionCancelled`. The model runs in eval mode without gradients;
    its training mode is restored afterwards.
    """
    dims, channels = _model_dims(model)
    prepared = prepare_image(image, dims, channels, normalization)
    dev = _network_device(model, device)
    options = _tiling_options(tta, tile, combine, fg_thresh, tta_batch_size, precision, progress)
    return _run_network(model, prepared[np.newaxis], dev, options)[0]


def images_per_batch(
    spatial: Sequence[int], device: torch.device | str | None = None, batch_voxels: int | None = None
) -> int:
    """How many images of spatial shape ``spatial`` run through the network together: at most
    ``batch_voxels`` padded voxels (default: :data:`BATCH_VOXELS` of ``device``'s type), one image at least."""
    budget = (
        BATCH_VOXELS.get(resolve_device(device).type, BATCH_VOXELS["cpu"]) if batch_voxels is None else batch_voxels
    )
    return max(1, budget // math.prod(round_up(n) for n in spatial))


def plan_batches(
    shapes: Sequence[Sequence[int]], device: torch.device | str | None = None, batch_voxels: int | None = None
) -> list[list[int]]:
    """Indices of ``shapes`` (each an image's ``(C, *S)``) in batches: images of one shape together, in their
    order, at most :func:`images_per_batch` per batch; batches ordered by their first image."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(int(n) for n in shape), []).append(index)
    batches = []
    for shape, members in groups.items():
        size = images_per_batch(shape[1:], device, batch_voxels)
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    return sorted(batches, key=lambda batch: batch[0])


def batch_progress(progress: Progress, before: int, size: int, n_images: int) -> Progress:
    """``progress`` of a batch of ``size`` images after ``before`` others of ``n_images``: ``done / total`` is
    the fraction of all the images' work (blocks of the batches done so far)."""

    def report(done: int, total: int) -> bool | None:
        return progress(before * total + done * size, n_images * total)

    return report


def predict_raw_batch(
    model: torch.nn.Module,
    images: Sequence[np.ndarray | torch.Tensor],
    *,
    device: torch.device | str | None = None,
    tta: bool = False,
    tile: Sequence[int] | str | None = "auto",
    normalization: Normalization = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    combine: TTACombine | str = TTACombine.median,
    fg_thresh: float = 0.5,
    tta_batch_size: int = TTA_BATCH,
    progress: Progress | None = None,
    batch_voxels: int | None = None,
) -> list[np.ndarray]:
    """Raw outputs of each of ``images`` (as :func:`predict_raw`, in their order): images of one shape run
    through the network together in the batches of :func:`plan_batches` (``batch_voxels`` as there). Each
    output equals :func:`predict_raw`'s of that image up to float rounding. ``progress(done, total)``:
    ``done / total`` is the fraction of the work done."""
    dims, channels = _model_dims(model)
    prepared = [prepare_image(image, dims, channels, normalization) for image in images]
    dev = _network_device(model, device)
    outputs: list[np.ndarray | None] = [None] * len(prepared)
    done = 0
    for batch in plan_batches([p.shape for p in prepared], dev, batch_voxels):
        report = None if progress is None else batch_progress(progress, done, len(batch), len(prepared))
        options = _tiling_options(tta, tile, combine, fg_thresh, tta_batch_size, precision, report)
        raw = _run_network(model, np.stack([prepared[i] for i in batch]), dev, options)
        for i, index in enumerate(batch):
            outputs[index] = raw[i]
        done += len(batch)
    return [out for out in outputs if out is not None]


def segment(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    step: float | Sequence[float] | None = None,
    tta: bool = False,
    tile: Sequence[int] | str | None = "auto",
    fg_thresh: float = 0.5,
    seed_thresh: float = 0.9,
    min_size: int = 36,
    max_radius: float | Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    normalization: Normalization = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    combine: TTACombine | str = TTACombine.median,
) -> np.ndarray:
    """Instance labels ``S`` int32 (0 = background) of ``image`` (shapes as in :func:`predict_raw`).

    ``step``: embedding length of one pixel step per array axis (default
    :func:`embedseg_service.core.model.embedding.step_for`); ``fg_thresh``, ``seed_thresh``, ``min_size``,
    ``max_radius`` go to :func:`embedseg_service.core.inference.clustering.cluster`, which runs on the same
    device as the network; objects that later objects cut down to ``min_size`` pixels or fewer are dropped
    (:func:`embedseg_service.core.inference.clustering.drop_fragments`). ``combine`` is the rule that merges the TTA
    passes (:class:`embedseg_service.core.inference.tta.TTACombine`).
    """
    return segment_batch(model, [image], step=step, tta=tta, tile=tile, fg_thresh=fg_thresh, seed_thresh=seed_thresh,
                         min_size=min_size, max_radius=max_radius, device=device, progress=progress,
                         normalization=normalization, precision=precision, combine=combine)[0]  # fmt: skip


def segment_batch(
    model: torch.nn.Module,
    images: Sequence[np.ndarray | torch.Tensor],
    *,
    step: float | Sequence[float] | None = None,
    tta: bool = False,
    tile: Sequence[int] | str | None = "auto",
    fg_thresh: float = 0.5,
    seed_thresh: float = 0.9,
    min_size: int = 36,
    max_radius: float | Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    normalization: Normalization = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    combine: TTACombine | str = TTACombine.median,
    batch_voxels: int | None = None,
) -> list[np.ndarray]:
    """Instance labels of each of ``images`` (as :func:`segment`, in their order); the network runs on
    batches of images of one shape (:func:`predict_raw_batch`, ``batch_voxels`` as there), each image is
    clustered on its own."""
    from embedseg_service.core.inference.clustering import cluster, drop_fragments
    from embedseg_service.core.model.embedding import step_for

    dims, _ = _model_dims(model)
    raws = predict_raw_batch(model, images, device=device, tta=tta, tile=tile, normalization=normalization,
                             precision=precision, combine=combine, fg_thresh=fg_thresh, progress=progress,
                             batch_voxels=batch_voxels)  # fmt: skip
    params = next(model.parameters(), None)
    where = params.device if params is not None else resolve_device(device)
    labels = []
    for raw in raws:
        found = cluster(raw, step=step_for(dims) if step is None else step, fg_thresh=fg_thresh,
                        seed_thresh=seed_thresh, min_size=min_size, max_radius=max_radius, device=where)  # fmt: skip
        labels.append(drop_fragments(np.asarray(found, dtype=np.int32), min_size))
    return labels
