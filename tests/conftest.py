"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DATA_DIR, DSB_MODEL_EPOCHS, DSB_MODEL_SEED, DSB_SPLIT_ROW, dsb_image, torch_threads

pytest_plugins = ("s3_server",)  # the SeaweedFS S3 server fixture, s3_server

# Starlette's test client sends "Host: testserver"; every app the tests build answers it too.
os.environ.setdefault("EMBEDSEG_ALLOWED_HOSTS", '["localhost", "127.0.0.1", "::1", "testserver"]')


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--artefacts DIR``: keep what tests save for people to look at (the dashboard's screenshots) in DIR;
    ``--readme-screenshots``: the dashboard's browser test also rewrites the README's screenshots."""
    parser.addoption("--artefacts", type=Path, default=None,
                     help="folder for test artefacts such as screenshots (default: the test's tmp_path)")  # fmt: skip
    parser.addoption("--readme-screenshots", action="store_true",
                     help="rewrite the README's dashboard screenshots under docs/images")  # fmt: skip


@pytest.fixture
def artefacts(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Folder for what a test saves for people to look at: ``--artefacts DIR``/<test name>, else ``tmp_path``."""
    root = request.config.getoption("--artefacts")
    folder = Path(root) / request.node.name if root is not None else tmp_path / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the small real microscopy files shipped with the tests."""
    return DATA_DIR


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test on one torch CPU thread (results independent of the core count), then restore."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def dsb_training(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The :class:`embedseg_service.core.training.train.TrainResult` of the 2D model trained once per run on
    the top :data:`helpers.DSB_SPLIT_ROW` rows of the DSB image: :data:`helpers.DSB_MODEL_EPOCHS` epochs x
    10 optimiser steps of 7 crops, seed :data:`helpers.DSB_MODEL_SEED`, one torch thread on the CPU.
    ``tests/e2e/test_train_nuclei2d.py`` states its quality floors; other tests use it as a trained model."""
    from embedseg_service.core.training.train import TrainConfig, train

    image, mask = dsb_image()
    config = TrainConfig(spatial_dims=2, epochs=DSB_MODEL_EPOCHS, samples_per_epoch=10 * 7, seed=DSB_MODEL_SEED,
                         device="cpu")  # fmt: skip
    with torch_threads(1):
        return train(image[:DSB_SPLIT_ROW], mask[:DSB_SPLIT_ROW], config,
                     out_path=tmp_path_factory.mktemp("dsb-model") / "dsb.pt")  # fmt: skip


@pytest.fixture(scope="session")
def dsb_model(dsb_training: Any) -> Path:
    """Checkpoint file of :func:`dsb_training`'s model."""
    return Path(dsb_training.model_path)
