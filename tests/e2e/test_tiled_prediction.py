"""Tiled and whole-image prediction give the same objects, on trained models of several seeds and an
under-trained one, in 2D and 3D, for several tile sizes (the tile bounds memory, never the result).

Models: 2D on the top 384 rows of the DSB image (seed 0: the session's ``dsb_model``, 24 epochs x 10
steps; seeds 1, 2: 6 epochs x 10 steps; under-trained: 1 epoch x 2 steps), 3D on the synthetic nuclei
volume (seeds 0, 1, 2: 6 epochs x 10 steps; under-trained: 1 epoch x 2 steps; it segments the volume
repeated 2 x 2 in YX, so that blocks split it); one torch thread on the CPU. Each predicts the whole
image once with ``tile=None`` and once with every tile size: the raw outputs must agree to float
rounding and the labels clustered from them at IoU 0.9 (AP0.9 >= 0.99); those labels are clustered as
``TrainedModel.segment`` clusters, which the seed-0 models check against ``segment`` itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import DSB_MODEL_EPOCHS, DSB_MODEL_SEED, DSB_SPLIT_ROW

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.inference.clustering import cluster, drop_fragments
from embedseg_service.core.inference.predict import predict_raw
from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.checkpoint import TrainedModel, load_model
from embedseg_service.core.training.train import TrainConfig, train

AGREEMENT = 0.99
MODELS = [(0, 6), (1, 6), (2, 6), (3, 1)]  # (seed, epochs); the last one is deliberately under-trained
TILES = {2: [(64, 64), (128, 200), (256, 256)], 3: [(8, 64, 64), (32, 96, 64), (16, 120, 72)]}
RAW_TOLERANCE = 1e-4


def _train(image: np.ndarray, mask: np.ndarray, dims: int, seed: int, epochs: int, out: Path) -> TrainedModel:
    steps = 10 if epochs > 1 else 2
    extra = {"crop_size": (16, 24, 24), "batch_size": 4, "virtual_batch": 1} if dims == 3 else {}
    config = TrainConfig(spatial_dims=dims, epochs=epochs, samples_per_epoch=steps * (4 if dims == 3 else 7),
                         seed=seed, device="cpu", **extra)  # fmt: skip
    result = train(image, mask, config, out_path=out / f"model{dims}d-{seed}-{epochs}.pt")
    return load_model(result.model_path, device="cpu")


def _agreement(whole: np.ndarray, tiled: np.ndarray) -> float:
    if whole.max() == 0 and tiled.max() == 0:
        return 1.0
    return float(average_precision(whole, tiled, (0.9,)).ap[0])


def _labels(model: TrainedModel, raw: np.ndarray) -> np.ndarray:
    """Labels of raw outputs, clustered with the options :meth:`TrainedModel.segment` passes by default."""
    size = model.min_object_size
    labels = cluster(raw, step=model.step, fg_thresh=0.5, seed_thresh=0.9, min_size=size,
                     max_radius=model.max_seed_radius, device=model.device)  # fmt: skip
    return drop_fragments(np.asarray(labels, dtype=np.int32), size)


def _check_tiles(model: TrainedModel, image: np.ndarray, tiles: list[tuple[int, ...]], name: str,
                 check_segment: bool) -> None:  # fmt: skip
    """Each tile size: raw outputs within :data:`RAW_TOLERANCE` of the whole image's, labels in agreement.
    Every output is predicted once and clustered as ``segment`` clusters it (``check_segment``: the
    whole image's labels also equal ``segment``'s)."""
    prepared = model.prepare(image)
    whole_raw = predict_raw(model.net, prepared, tile=None)
    whole = _labels(model, whole_raw)
    if check_segment:
        assert np.array_equal(whole, model.segment(image, tta=False, tile=None)), name
    for tile in tiles:
        raw = predict_raw(model.net, prepared, tile=tile)
        error = float(np.abs(raw - whole_raw).max())
        assert error <= RAW_TOLERANCE, (name, tile, error)
        tiled = _labels(model, raw)
        score = _agreement(whole, tiled)
        print(
            f"{name}: tile {tile} vs whole: AP0.9 {score:.3f} ({whole.max()} / {tiled.max()} objects), "
            f"raw outputs differ by {error:.1e} at most"
        )
        assert score >= AGREEMENT, (name, tile, score)


DATA = {2: ("nuclei2d_dsb", "dsb2018_img2d.tif"), 3: ("nuclei3d_synthetic", "synthetic_img3d.tif")}


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("seed", "epochs"), MODELS)
@pytest.mark.usefixtures("one_torch_thread")
def test_tiled_labels_equal_whole_image_labels(dims, seed, epochs, data_dir: Path, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:  # fmt: skip
    folder, name = DATA[dims]
    image = read_tiff(data_dir / folder / "images" / name).data
    mask = read_tiff(data_dir / folder / "masks" / name).data
    if dims == 2 and seed == DSB_MODEL_SEED:  # the session's model of this seed, trained once per run
        model, epochs = load_model(request.getfixturevalue("dsb_model"), device="cpu"), DSB_MODEL_EPOCHS
    elif dims == 2:  # train on the top rows, segment the whole image
        model = _train(image[:DSB_SPLIT_ROW], mask[:DSB_SPLIT_ROW], 2, seed, epochs, tmp_path)
    else:  # train on the volume, segment it repeated 2 x 2 in YX
        model = _train(image, mask, 3, seed, epochs, tmp_path)
        image = np.tile(image, (1, 2, 2))
    _check_tiles(model, image, TILES[dims], f"{dims}D seed {seed}, {epochs} epochs", check_segment=seed == 0)
    if dims == 2 and seed == 0:  # the same holds with test-time augmentation
        whole = model.segment(image, tta=True, tile=None)
        tiled = model.segment(image, tta=True, tile=(128, 128))
        assert _agreement(whole, tiled) >= AGREEMENT
