"""Crops per optimiser step: the batch of one forward pass and the virtual multiplier m (docs/method.md §9)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EFFECTIVE_BATCH = 16
"""batch × virtual multiplier m (docs/method.md §9): one forward pass of 16 crops where they fit
:data:`MAX_BATCH_VOXELS`, else a smaller batch accumulated over m passes."""

MIN_CONTEXT_BATCH = 2
"""Fewest crops per step when crops are enlarged for context (batch-norm statistics need more than one)."""

MAX_BATCH_VOXELS = {2: 16 * 256 * 256, 3: 2 * 32 * 136 * 136}
"""Largest number of crop voxels in one forward pass: 16 × 256² in 2D; 2 × 32 × 136² in 3D, which
gives the paper's 2 × 8 for its 3D crops and 16 × 1 for small ones, whose optimiser steps are faster
than 2 × 8 on a GPU (benchmarks/bench_gpu.py ``train3d``, figures in benchmarks/RESULTS.md)."""

CPU_STEP_VOXELS_3D = 4 * 8 * 136 * 136
"""Crop voxels of a 3D optimiser step on the CPU, where a step's time grows with its voxels: the
reference's 3D batch of 4 crops of 8 × 136². More, smaller steps reach a useful model sooner in a
CPU budget than few steps of 16 large crops."""

CPU_CROPS_3D = (4, 16)
"""Fewest and most crops of a 3D optimiser step on the CPU."""

MIN_STEPS_PER_EPOCH = 10
"""A small training set repeats its crops so that an epoch has at least this many optimiser steps."""


def choose_batch(
    spatial_dims: int,
    crop_shape: Sequence[int],
    batch_size: int | None,
    virtual_batch: int | None,
    object_crop_shape: Sequence[int] | None = None,
    device_type: str = "cuda",
) -> tuple[int, int]:
    """Batch size and virtual multiplier m: batch × m crops per optimiser step.

    16 crops per step, or, where the crop was enlarged for context beyond ``object_crop_shape``
    (:data:`embedseg_service.core.training.hyperparams.MIN_CONTEXT_SIDE`), as many fewer as the crop is larger (16 × 48²
    becomes 4 × 96²; at least :data:`MIN_CONTEXT_BATCH`), so a step costs what it did. In 3D on the
    CPU (``device_type`` ``"cpu"``) a step holds at most :data:`CPU_STEP_VOXELS_3D` crop voxels, and
    4 to 16 crops (:data:`CPU_CROPS_3D`). The automatic batch starts there and halves (raising m)
    until one forward pass holds at most :data:`MAX_BATCH_VOXELS` voxels: 16 × 1 for small crops,
    2 × 8 for 3D crops of 32 × 136² on a GPU.
    """
    voxels = int(np.prod(crop_shape))
    effective = EFFECTIVE_BATCH
    if object_crop_shape is not None:
        ratio = float(np.prod(object_crop_shape)) / float(voxels)
        if ratio < 1.0:
            effective = max(MIN_CONTEXT_BATCH, round(EFFECTIVE_BATCH * ratio))
    if spatial_dims == 3 and device_type == "cpu":
        low, high = CPU_CROPS_3D
        effective = min(effective, max(low, min(high, CPU_STEP_VOXELS_3D // voxels)))
    if batch_size is None:
        batch = effective
        while batch > 1 and batch * voxels > MAX_BATCH_VOXELS[spatial_dims]:
            batch //= 2
    else:
        batch = int(batch_size)
    m = int(virtual_batch) if virtual_batch is not None else max(1, round(effective / batch))
    return batch, m


def steps_and_samples(samples_per_epoch: int | None, n_crops: int, batch: int, m: int) -> tuple[int, int]:
    """Optimiser steps per epoch and crops per epoch (a whole number of steps): ``samples_per_epoch``, else
    every crop once, repeated up to :data:`MIN_STEPS_PER_EPOCH` steps."""
    samples = samples_per_epoch or max(n_crops, MIN_STEPS_PER_EPOCH * batch * m)
    steps_per_epoch = max(1, samples // (batch * m))
    return steps_per_epoch, steps_per_epoch * batch * m
