"""Batch-norm statistics re-estimated on whole images, for the network as it will be used.

Training sees object-centred crops only: at the encoder's 1/8 scale a 48² crop is a 6×6 map
whose dilated convolutions read mostly padding, and the running statistics that batch norm keeps
describe those maps. On a whole image the same layers see real context, their activations leave
the range the statistics were taken on, and in eval mode they can grow block after block until a
spurious seed with an enormous bandwidth swallows the image. Re-estimating the statistics on whole
training images, with the weights unchanged, removes that mismatch.

Whole-image statistics alone cost precision at object boundaries, though: they describe mostly
background, while the weights were fitted under the statistics of object-centred crops. The saved
statistics are therefore an equal mixture of the two distributions (:data:`KEEP_TRAINING`;
docs/method.md §9; measured effects in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import product

import numpy as np
import torch
from torch import nn

from embedseg_service.core.inference.padding import pad_to_multiple
from embedseg_service.core.inference.tile_size import auto_tile_shape, axis_starts

MAX_WINDOWS = 64
"""Most forward passes spent on one calibration (a seeded subset of windows beyond that)."""
KEEP_TRAINING = 0.5
"""Weight of the training-time (crop) statistics in the calibrated ones; the rest is from whole images."""


def _windows(shape: Sequence[int], tile: Sequence[int]) -> list[tuple[slice, ...]]:
    """Non-overlapping windows of ``tile`` covering ``shape`` (the last window of an axis ends at its end)."""
    per_axis = [[slice(s, s + t) for s in axis_starts(n, t, 0.0)] for n, t in zip(shape, tile)]
    return [tuple(w) for w in product(*per_axis)]


@torch.no_grad()
def calibrate_batch_norm(
    net: nn.Module,
    images: Sequence[np.ndarray],
    *,
    device: torch.device,
    seed: int = 0,
    max_windows: int = MAX_WINDOWS,
    keep: float = KEEP_TRAINING,
) -> nn.Module:
    """A copy of ``net`` whose batch-norm running statistics are re-estimated on ``images``.

    ``images`` are normalised ``(C, *S)`` float32 arrays. Each is run whole (reflect-padded to a
    multiple of 8) when it fits the device's free memory, else in non-overlapping windows of the
    largest shape that fits; at most ``max_windows`` passes (a subset seeded by ``seed``). Batch
    norm layers see the images in training mode with a cumulative average; dropout stays off.
    The result is the mixture of two distributions: ``keep`` of ``net``'s own statistics and
    ``1 - keep`` of those over ``images`` (means mixed linearly; variances as a mixture's, i.e. plus
    ``keep * (1 - keep)`` times the squared difference of the means). ``keep = 0`` gives the
    images' statistics alone. ``net`` itself is not changed. Returns the copy in eval mode, on ``device``.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    calibrated = copy.deepcopy(net).to(device)
    norms = [m for m in calibrated.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not images:
        return calibrated.eval()
    windows: list[tuple[int, tuple[slice, ...]]] = []
    for index, image in enumerate(images):
        spatial = tuple(int(s) for s in image.shape[1:])
        tile = auto_tile_shape(spatial, device=device)
        windows.extend((index, w) for w in _windows(spatial, tile))
    if len(windows) > max_windows:
        chosen = np.random.default_rng([seed, 11]).choice(len(windows), max_windows, replace=False)
        windows = [windows[int(i)] for i in np.sort(chosen)]
    calibrated.eval()
    own = [tuple(stat.clone() for stat in _running_statistics(norm)) for norm in norms]
    momenta = []
    for norm in norms:
        momenta.append(norm.momentum)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes
        norm.train()
    try:
        for index, window in windows:
            x = torch.from_numpy(np.ascontiguousarray(images[index][(slice(None),) + window], dtype=np.float32))
            calibrated(pad_to_multiple(x.unsqueeze(0).to(device)))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()
    if keep > 0.0:
        for norm, (mean, var) in zip(norms, own):
            running_mean, running_var = _running_statistics(norm)
            gap = (mean - running_mean) ** 2
            running_mean.mul_(1.0 - keep).add_(keep * mean)
            running_var.mul_(1.0 - keep).add_(keep * var + keep * (1.0 - keep) * gap)
    return calibrated


def _running_statistics(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean and variance of a batch-norm layer (the network's layers all keep them)."""
    mean, var = norm.running_mean, norm.running_var
    if mean is None or var is None:
        raise ValueError(f"{type(norm).__name__} keeps no running statistics (track_running_stats=False)")
    return mean, var
