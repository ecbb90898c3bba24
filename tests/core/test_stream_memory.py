"""A volume whose float32 size is four times the memory a prediction may use is predicted under that limit
(docs/method.md §11.5), into an OME-Zarr label image whose objects are those of a whole prediction.

The prediction runs in a child process (``stream_helpers.py``). After its imports it may grow by at most
:data:`LIMIT` bytes: RLIMIT_DATA is set to its data size then plus the limit (an allocation beyond fails,
and the child with it), and a thread samples its resident memory every millisecond; the peak growth is
asserted under the limit. The child runs with one malloc arena and a 1 MiB mmap threshold, so that freed
arrays go back to the system and the resident size measures what is in use.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import stream_helpers
from stream_helpers import TinyStagedNet, write_blob_volume

from embedseg_service.core.data.normalization import normalize
from embedseg_service.core.data.ome_zarr import OmeZarrVolume, zip_folder
from embedseg_service.core.inference.predict import segment
from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.embedding import step_for

LIMIT = 64 * 1024**2
"""Bytes the predicting process may grow by."""
SHAPE = (32, 1456, 1456)
"""The volume (uint8 on disk): 4 x 67.8 M float32 bytes, more than 4 x :data:`LIMIT`."""
BLOCK = (32, 256, 256)


def _inner_objects(labels: np.ndarray, band: int) -> np.ndarray:
    """``labels`` without the objects that come within ``band`` pixels of the Y or X border."""
    out = labels.copy()
    edge = np.zeros(labels.shape, bool)
    edge[:, :band], edge[:, -band:], edge[:, :, :band], edge[:, :, -band:] = True, True, True, True
    out[np.isin(out, np.unique(out[edge & (out > 0)]))] = 0
    return out


def test_a_volume_four_times_the_memory_limit_is_predicted_under_it(tmp_path: Path) -> None:
    assert 4 * math.prod(SHAPE) >= 4 * LIMIT
    source = write_blob_volume(tmp_path, SHAPE, BLOCK, BLOCK)
    folder = tmp_path / "labels.ome.zarr"
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1024**2)}
    child = subprocess.run([sys.executable, stream_helpers.__file__, str(source), str(folder), str(LIMIT)],
                           capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["peak"] - report["baseline"] < LIMIT, report
    assert report["n_objects"] > 3700 and report["cut"] == 0, report

    archive = zip_folder(folder, tmp_path / "labels.ome.zarr.zip")
    assert archive > 0
    with OmeZarrVolume(tmp_path / "labels.ome.zarr.zip") as labels:
        assert labels.info.shape == SHAPE and labels.info.axes == "ZYX" and labels.info.dtype == np.uint32
        assert labels.info.voxel_size == (1.0, 1.0, 1.0)
        crop = (slice(0, 32), slice(512, 768), slice(512, 1024))  # whole generated blocks
        streamed = labels.read(crop).astype(np.int64)
    with OmeZarrVolume(source) as image:
        pixels = image.read(crop)
    whole = segment(TinyStagedNet().eval(), normalize(pixels), step=step_for(3), tile=None, min_size=50, device="cpu")
    inner_whole, inner_streamed = _inner_objects(whole, 16), _inner_objects(streamed, 16)
    assert int(np.unique(inner_whole).size) - 1 >= 100
    assert average_precision(inner_whole, inner_streamed, [0.5, 0.9]).ap == [1.0, 1.0]
