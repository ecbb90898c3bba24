"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the small real microscopy files shipped with the tests."""
    return DATA_DIR


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test on one torch CPU thread (results independent of the core count), then restore."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
