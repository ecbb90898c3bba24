"""Prediction: raw network outputs for a whole image or volume, and instance labels (docs/method.md §7, §11.3).

:func:`predict_raw` runs the network in eval mode without gradients, block by block with the
outputs of the whole image (:mod:`embedseg_service.core.inference.tiling`), optionally with test-time augmentation
(:mod:`embedseg_service.core.inference.tta`), and returns the raw outputs on the CPU. :func:`segment` clusters them
into int32 labels with :func:`embedseg_service.core.inference.clustering.cluster`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.tiling import Progress, predict_tiled
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


def predict_raw(
    model: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    tta: bool = False,
    tile: Sequence[int] | str | None = "auto",
    normalization: Normalization = None,
    amp: bool = False,
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
    :func:`embedseg_service.core.inference.tta.predict_tta`). ``amp`` uses float16 autocast on CUDA. ``progress(done,
    total)`` is called per block; returning ``False`` raises
    :class:`embedseg_service.core.inference.tiling.PredictionCancelled`. The model runs in eval mode without gradients;
    its training mode is restored afterwards.
    """
    dims, channels = _model_dims(model)
    prepared = prepare_image(image, dims, channels, normalization)
    params = next(model.parameters(), None)
    if device is None:
        dev = params.device if params is not None else resolve_device("auto")
    else:
        dev = resolve_device(device)
        if params is not None and params.device != dev:
            model.to(dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return predict_tiled(
                model,
                prepared,
                tile=tile,
                device=dev,
                tta=tta,
                tta_options={"combine": combine, "fg_thresh": fg_thresh, "batch_size": tta_batch_size},
                amp=amp,
                progress=progress,
            )
    finally:
        model.train(was_training)


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
    amp: bool = False,
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
    from embedseg_service.core.inference.clustering import cluster, drop_fragments
    from embedseg_service.core.model.embedding import step_for

    dims, _ = _model_dims(model)
    raw = predict_raw(
        model,
        image,
        device=device,
        tta=tta,
        tile=tile,
        normalization=normalization,
        amp=amp,
        combine=combine,
        fg_thresh=fg_thresh,
        progress=progress,
    )
    params = next(model.parameters(), None)
    where = params.device if params is not None else resolve_device(device)
    labels = cluster(
        raw,
        step=step_for(dims) if step is None else step,
        fg_thresh=fg_thresh,
        seed_thresh=seed_thresh,
        min_size=min_size,
        max_radius=max_radius,
        device=where,
    )
    return drop_fragments(np.asarray(labels, dtype=np.int32), min_size)
