"""End to end in 3D on the synthetic nuclei volume: train on part of it, segment the rest.

Data: ``tests/data/nuclei3d_synthetic`` (31 x 61 x 57 ZYX, 51 nuclei, exact labels). Split along Y:
rows 0-45 are given to :func:`embedseg_service.core.training.train.train` (which holds out its last 7 rows for
validation); rows 46-60 are never seen in training and are segmented with the saved model.

Budget: 12 epochs x 10 optimiser steps of 4 crops of 16 x 24 x 24 (batch 4, no virtual batch), seed 0,
one torch thread on the CPU, no time limit.

A CPU budget of this size is not enough for objects to emerge on this volume (dense, blurred and noisy
nuclei, 39 of them in the training part); it takes minutes of GPU training (figures, also of the
reference trained on the same batches: ``benchmarks/RESULTS.md``). So this test asserts that the model
learns (loss and oracle IoU) and that the whole 3D path (data properties, crops, checkpoint, prediction
of a volume) works; the AP floor of a 3D training is asserted on a generated volume in
``test_train_3d_recovers_the_objects_of_a_generated_volume``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import otsu_labels, seeds_from_env, smallest_object

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.synthetic import render_confocal, touching_nuclei_labels
from embedseg_service.core.metrics import average_precision, default_thresholds
from embedseg_service.core.model.checkpoint import load_model
from embedseg_service.core.training.train import TrainConfig, train

SPLIT_ROW = 46


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_train_3d_learns_and_segments_the_held_out_part(data_dir: Path, tmp_path: Path) -> None:
    name = "synthetic_img3d.tif"
    image = read_tiff(data_dir / "nuclei3d_synthetic" / "images" / name).data
    mask = read_tiff(data_dir / "nuclei3d_synthetic" / "masks" / name).data
    config = TrainConfig(spatial_dims=3, epochs=12, samples_per_epoch=40, crop_size=(16, 24, 24), batch_size=4,
                         virtual_batch=1, seed=0, device="cpu")  # fmt: skip
    result = train(image[:, :SPLIT_ROW], mask[:, :SPLIT_ROW], config, out_path=tmp_path / "nuclei3d.pt")
    model = load_model(result.model_path, device="cpu")
    labels = model.segment(image[:, SPLIT_ROW:], tta=False, tile=None)

    assert result.stopped == "completed" and result.epochs_completed == 12
    epochs = [h for h in result.history if "loss" in h]
    losses = [h["loss"] for h in epochs]
    ious = [h["val_iou"] for h in epochs]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses
    assert max(ious) > ious[0] + 0.04, ious
    assert model.spatial_dims == 3 and model.properties["crop_shape"] == [16, 24, 24]
    assert model.properties["n_objects"] > 0 and model.properties["foreground_weight"] > 1.0
    assert labels.shape == (31, 61 - SPLIT_ROW, 57) and labels.dtype == np.int32


GENERATED_SHAPE = (14, 96, 96)
GENERATED_OBJECTS = 12
GENERATED_RADIUS = ((2.5, 4.0), (9.0, 13.0), (9.0, 13.0))
"""Semi-axes (Z, Y, X) in voxels: nuclei 18-26 px wide over 5-8 slices, flattened along Z once the
voxel size is taken into account."""
GENERATED_VOXEL = (0.5, 0.2, 0.2)
GENERATED_DATA = {"train": (100, 101), "val": (110,), "test": (120,)}
"""Seeds of the generated volumes of each split (labels and image alike)."""
GENERATED_EPOCHS = 36
MARGIN = {"plain": (0.6, 0.5), "tta": (0.7, 0.55)}
"""How far the model must beat Otsu + connected components: (AP0.5, mean AP over IoU 0.1-0.9)."""


def _touching(seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = touching_nuclei_labels(GENERATED_SHAPE, GENERATED_OBJECTS, GENERATED_RADIUS, seed=seed)
    return render_confocal(labels, seed=seed), labels


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds_from_env())
@pytest.mark.usefixtures("one_torch_thread")
def test_train_3d_recovers_the_objects_of_a_generated_volume(seed: int, tmp_path: Path) -> None:
    """Data: generated stacks of 14 x 96 x 96 voxels of 0.5 x 0.2 x 0.2 µm (anisotropy 2.5), each with 12
    nuclei that mostly touch a neighbour (no background between them, a dimmer shared boundary) on a
    background with a ramp and blotches, blurred and noisy (``core.data.synthetic.touching_nuclei_labels``,
    ``render_confocal``): two stacks train, a third validates, a fourth is segmented, never seen.

    Budget: :data:`GENERATED_EPOCHS` epochs x 10 optimiser steps of 4 data-derived crops, every other option
    data-derived, seed from the parameter (``EMBEDSEG_TEST_SEEDS=0,1,2`` runs those seeds), one torch
    thread on the CPU.

    Floors: the baseline is Otsu's threshold + connected components larger than half the smallest
    training nucleus (the model's minimum object size), on the same unseen stack; the model must beat its
    AP0.5 and its mean AP over IoU 0.1-0.9 by :data:`MARGIN`, without and with TTA.
    """
    train_data = [_touching(s) for s in GENERATED_DATA["train"]]
    (val_image, val_labels), (image, truth) = _touching(GENERATED_DATA["val"][0]), _touching(GENERATED_DATA["test"][0])
    config = TrainConfig(spatial_dims=3, epochs=GENERATED_EPOCHS, samples_per_epoch=40, batch_size=4,
                         virtual_batch=1, seed=seed, device="cpu", voxel_size=GENERATED_VOXEL)  # fmt: skip
    result = train([i for i, _ in train_data], [m for _, m in train_data], config, out_path=tmp_path / "touching.pt",
                   val_images=[val_image], val_masks=[val_labels])  # fmt: skip
    model = load_model(result.model_path, device="cpu")
    thresholds = default_thresholds(3)
    at_half = thresholds.index(0.5)
    min_size = min(smallest_object(m) for _, m in train_data) // 2
    baseline = average_precision(truth, otsu_labels(image, min_size), thresholds)
    scores = {"plain": average_precision(truth, model.segment(image, tta=False, tile=None), thresholds),
              "tta": average_precision(truth, model.segment(image, tta=True, tile=None), thresholds)}  # fmt: skip
    print(
        f"seed {seed}: Otsu AP0.5 {baseline.ap[at_half]:.3f} mAP {np.mean(baseline.ap):.3f}; "
        + "; ".join(
            f"{name} AP0.5 {s.ap[at_half]:.3f} mAP {np.mean(s.ap):.3f} ({s.n_pred} of {s.n_gt})"
            for name, s in scores.items()
        )
    )

    assert result.stopped == "completed" and not result.best_metrics.get("degenerate")
    assert model.properties["anisotropy"] == pytest.approx(2.5)
    assert baseline.ap[at_half] <= 0.2  # touching nuclei defeat the threshold
    for name, score in scores.items():
        ap_margin, map_margin = MARGIN[name]
        assert score.ap[at_half] >= baseline.ap[at_half] + ap_margin, (name, score.ap)
        assert np.mean(score.ap) >= np.mean(baseline.ap) + map_margin, (name, score.ap)
