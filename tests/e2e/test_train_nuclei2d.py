"""End to end on real, manually annotated data: train on part of the DSB 2018 nuclei image, segment the rest.

Data: ``tests/data/nuclei2d_dsb`` (512 x 512, 125 nuclei). Split: rows 0-383 are given to
:func:`embedseg_service.core.training.train.train` (which holds out its last rows for validation, by its spatial split
of a single image); rows 384-511 (36 nuclei, some cut by the split) are never seen in training and are segmented
with the saved best model, without and with TTA, and scored with AP_dsb at IoU 0.5.

Budget: 24 epochs x 10 optimiser steps of 7 crops, seed 0, one torch thread on the CPU, no time limit (the
result does not depend on the machine's speed, but float kernels differ between CPUs, so the weights do too).
The model is the session fixture ``dsb_training`` (``tests/conftest.py``), trained once per run and also
used by the tests that need a trained model.

Floors are stated against the trivial baseline computed here: Otsu's threshold + connected components
larger than the smallest training object, on the same held-out rows. The model must beat it by
:data:`MARGIN` without TTA and by :data:`MARGIN_TTA` with TTA, margins that hold for any seed of this
budget (``benchmarks/RESULTS.md`` lists the seeds' scores).
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import DSB_MODEL_EPOCHS, DSB_SPLIT_ROW, baseline_ap, dsb_image, smallest_object

from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.checkpoint import load_model

MARGIN = 0.15
MARGIN_TTA = 0.25
TTA_TOLERANCE = 0.05  # test-time augmentation must not cost more than about one object of 36


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_train_on_top_segment_bottom(dsb_training: Any) -> None:
    image, mask = dsb_image()
    held_out, truth = image[DSB_SPLIT_ROW:], mask[DSB_SPLIT_ROW:]
    result = dsb_training  # trained once per run, shared with the tests that need a trained model
    assert result.stopped == "completed" and result.epochs_completed == DSB_MODEL_EPOCHS
    assert not result.best_metrics["degenerate"]

    model = load_model(result.model_path, device="cpu")
    labels = model.segment(held_out, tta=False)
    labels_tta = model.segment(held_out, tta=True)
    assert labels.shape == (512 - DSB_SPLIT_ROW, 512)
    baseline = baseline_ap(held_out, truth, min_size=smallest_object(mask[:DSB_SPLIT_ROW]))[0]
    score = average_precision(truth, labels, (0.5,))
    score_tta = average_precision(truth, labels_tta, (0.5,))
    assert score.n_gt == 36
    print(f"held-out AP0.5: Otsu + components {baseline:.3f}; model {score.ap[0]:.3f} ({score.n_pred} predicted), "
          f"with TTA {score_tta.ap[0]:.3f} ({score_tta.n_pred} predicted), {score.n_gt} annotated")  # fmt: skip
    assert score.ap[0] >= baseline + MARGIN, (score.ap[0], baseline)
    assert score_tta.ap[0] >= baseline + MARGIN_TTA, (score_tta.ap[0], baseline)
    assert score_tta.ap[0] >= score.ap[0] - TTA_TOLERANCE
