"""Helpers of the streamed-prediction tests: a tiny staged network, blob volumes written chunk by chunk as
zipped OME-Zarr stores, a comparison of label images up to renumbering, and a child process that predicts
one under a memory limit.

Importable as ``stream_helpers`` from every test module (``tests/`` is on ``sys.path``); run as a script it
is the child: ``python stream_helpers.py INPUT.zip OUTPUT_FOLDER LIMIT_BYTES`` prints one JSON line.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedseg_service.core.inference.tiling import NetworkStages
from embedseg_service.core.model.embedding import step_for

BLOB_RADIUS = 5.0
"""Radius (pixels) of the blobs of :func:`blob_block`."""
CELL = 4
"""Pixels per cell of :class:`TinyStagedNet`."""


class TinyStagedNet(torch.nn.Module):
    """A deterministic 3D network with the staged interface of the ERF-Net, cheap enough for volumes of
    hundreds of millions of voxels on a CPU.

    Encoder: the mean of each cell of :data:`CELL` pixels (no halo). Context: two 3x3x3 filters over the cell
    grid (half the weight on the centre; halo 1 each). Decoder: trilinear upsampling to pixels (reads one cell
    around), giving a smooth intensity ``v``;
    offsets 0, a constant sigma whose Gaussian reaches ``radius`` pixels, seed logit ``gain * (v - level)``.
    Bright blobs of about ``radius`` pixels come out as one object each.
    """

    spatial_dims = 3
    in_channels = 1

    def __init__(self, radius: float = 2.4 * BLOB_RADIUS, level: float = 0.12, gain: float = 40.0) -> None:
        super().__init__()
        h = step_for(3)[-1]
        self.sigma = math.log(math.log(2.0) / (radius * h) ** 2) / 10.0
        self.level, self.gain = level, gain
        self.box = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.box.weight.fill_(0.5 / 26.0)
            self.box.weight[0, 0, 1, 1, 1] = 0.5
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the model lives

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, CELL)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.box(self.box(x))

    def decode(self, grid: torch.Tensor) -> torch.Tensor:
        v = F.interpolate(grid, scale_factor=CELL, mode="trilinear", align_corners=False)
        out = v.new_empty((v.shape[0], 7, *v.shape[2:]))
        out[:, :3] = 0.0
        out[:, 3:6] = self.sigma
        torch.sub(v[:, 0], self.level, out=out[:, 6]).mul_(self.gain)
        return out

    def stages(self) -> NetworkStages:
        return NetworkStages(encode=self.encode, context=self.context, decode=self.decode, cell=CELL, encode_halo=0,
                             decode_halo=1)  # fmt: skip

    def context_steps(self) -> list[tuple[torch.nn.Module, int]]:
        return [(self.box, 1), (self.box, 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.context(self.encode(x)))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (equal up to renumbering, background kept)."""
    pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]), axis=1)
    return (
        np.array_equal(pairs[0] == 0, pairs[1] == 0)
        and np.unique(pairs[0]).size == pairs.shape[1]
        and np.unique(pairs[1]).size == pairs.shape[1]
    )


def blob_block(shape: Sequence[int], seed: int, spacing: float = 4.8 * BLOB_RADIUS) -> np.ndarray:
    """A uint8 block of bright balls of radius :data:`BLOB_RADIUS` (value 200 on 20) at jittered grid points
    ``spacing`` apart, every ball inside the block."""
    rng = np.random.default_rng(seed)
    out = np.full(tuple(shape), 20, np.uint8)
    r = BLOB_RADIUS
    axes = [np.arange(r + 2, n - r - 2, spacing) for n in shape]
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for centre in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3):
        c = centre + rng.uniform(-0.2, 0.2, 3) * (spacing - 2 * r - 4) / 2
        lo = [max(0, int(v - r - 1)) for v in c]
        hi = [min(n, int(v + r + 2)) for v, n in zip(c, shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        inside = (zz[box[0]] - c[0]) ** 2 + (yy[:, box[1]] - c[1]) ** 2 + (xx[..., box[2]] - c[2]) ** 2 <= r * r
        out[box][inside] = 200
    return out


def write_blob_volume(folder: Path, shape: Sequence[int], block: Sequence[int], chunks: Sequence[int]) -> Path:
    """A zipped OME-Zarr store ``folder/volume.ome.zarr.zip`` (uint8, ``shape``) of :func:`blob_block` blocks,
    each generated and written on its own (the whole volume is never in memory)."""
    import numcodecs
    import zarr
    from zarr.storage import LocalStore

    from embedseg_service.core.data.ome_zarr import zip_folder
    from embedseg_service.core.data.volume_source import blocks

    store = folder / "volume.ome.zarr"
    group = zarr.open_group(store=LocalStore(store), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"}
                                                               for a in "zyx"],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]  # fmt: skip
    array = group.create_array("0", shape=tuple(shape), chunks=tuple(chunks), dtype="uint8",
                               compressors=numcodecs.Blosc(cname="lz4", clevel=1), fill_value=0)  # fmt: skip
    for k, region in enumerate(blocks(shape, block)):
        array[region] = blob_block([r.stop - r.start for r in region], seed=k)
    target = folder / "volume.ome.zarr.zip"
    zip_folder(store, target)
    return target


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


class PeakWatcher:
    """Samples this process's resident memory every millisecond on a thread; ``peak`` is the largest seen.
    (The kernel's high-water mark of the whole life, ``ru_maxrss``, includes the imports.)"""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def predict_in_child(source_zip: Path, out_folder: Path, limit: int) -> dict[str, Any]:
    """Predict ``source_zip`` with :class:`TinyStagedNet` into an OME-Zarr folder while the process may use at
    most ``limit`` bytes beyond its resident memory after the imports: RLIMIT_DATA is set to the data size
    now plus ``limit`` (allocations beyond fail) and a watcher measures the resident peak."""
    import zarr

    from embedseg_service.core.data.normalization import NormalizationSettings
    from embedseg_service.core.data.ome_zarr import OmeZarrVolume, create_labels
    from embedseg_service.core.data.volume_source import OmeZarrSource
    from embedseg_service.core.inference.stream import segment_streamed

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 2})  # thread stacks count as data
    net = TinyStagedNet().eval()
    with OmeZarrVolume(source_zip) as volume:
        out = create_labels(out_folder, volume.info.shape, voxel_size=volume.info.voxel_size, chunks=(32, 128, 128))
        source = OmeZarrSource(volume)
        source.read((slice(0, 32), slice(0, 512), slice(0, 512)))  # the readers' first use starts their threads
        baseline = rss_bytes()
        with open("/proc/self/status") as handle:
            data_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmData:"))
        resource.setrlimit(resource.RLIMIT_DATA, (data_kb * 1024 + limit, resource.RLIM_INFINITY))
        watcher = PeakWatcher()
        started = time.monotonic()
        result = segment_streamed(net, source, out, step=step_for(3), normalization=NormalizationSettings(),
                                  min_size=50, tile=(32, 128, 128), core=(32, 96, 96), margin=(24, 24, 24),
                                  device="cpu")  # fmt: skip
        peak = watcher.stop()
    return {"baseline": baseline, "peak": peak, "seconds": time.monotonic() - started,
            "n_objects": result.n_objects, "duplicates": result.duplicates, "cut": result.cut,
            "windows": result.windows}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(predict_in_child(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
