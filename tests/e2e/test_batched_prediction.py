"""Batched prediction with a trained model: the session's ``dsb_model`` segments crops of the held-out DSB
rows together (one network call per batch of one shape) into exactly the labels it gives them one at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import DSB_SPLIT_ROW, dsb_image

from embedseg_service.core.model.checkpoint import load_model


def held_out_crops(side: int) -> list[np.ndarray]:
    """The ``side``² crops of the held-out DSB rows, left to right, then the first of them flipped."""
    image, _ = dsb_image()
    rows = image[DSB_SPLIT_ROW:]
    crops = [rows[:side, x : x + side] for x in range(0, rows.shape[1] - side + 1, side)]
    return [*crops, crops[0][::-1].copy()]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_batched_labels_of_a_trained_model_equal_one_at_a_time(dsb_model: Path, tta: bool) -> None:
    model = load_model(dsb_model, device="cpu")
    images = held_out_crops(64) + held_out_crops(96)  # two shapes: two batches
    one = [model.segment(image, tta=tta) for image in images]
    many = model.segment_batch(images, tta=tta)
    assert sum(int(labels.max()) for labels in one) >= 20  # the crops hold nuclei the model finds
    for single, batched in zip(one, many, strict=True):
        np.testing.assert_array_equal(batched, single)
    single_at_a_time = model.segment_batch(images[:3], tta=tta, batch_voxels=1)
    for single, batched in zip(one[:3], single_at_a_time, strict=True):
        np.testing.assert_array_equal(batched, single)
