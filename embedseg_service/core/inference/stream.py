"""Instance labels of a volume larger than memory, window by window (docs/method.md §11.5).

The raw outputs come from :class:`embedseg_service.core.inference.stream_net.StreamedNetwork` (the whole
volume's, up to float rounding). The volume's cell grid is cut into *cores*; a core's *window* is the core
grown by a *margin* on every side (clipped to the volume). For each core, in raster order:

1. the window's raw outputs are clustered as a whole image is (docs/method.md §6, fragments dropped);
2. the core *owns* the window's objects whose centroid lies in the core (grown by half a pixel: an object
   whose centroid sits on a border, up to rounding, is claimed by both sides and kept once, see 3);
3. each owned object is written whole under a new label, into the voxels no object holds yet; an owned
   object whose voxels are mostly held already (by the same object, claimed from a neighbouring window)
   is skipped.

An object is seen whole by the window that owns it, and clustered with the seeds around it, when it and
the proposals that compete with it lie within the margin of its core; then the window's clustering gives
it the pixels the whole volume's gives it. Objects that cross core borders are written by one window
under one label. An owned object that touches the window's edge inside the volume may be cut: the result
counts them (a wider margin avoids them). Only one window's raw outputs and labels, and the grid blocks
the network reads, are in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from embedseg_service.core.data.normalization import NormalizationSettings
from embedseg_service.core.data.stream_stats import channel_scalings
from embedseg_service.core.data.volume_source import Region, VolumeSource, blocks
from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.clustering import cluster, drop_fragments
from embedseg_service.core.inference.defaults import DEFAULT_PRECISION, InferencePrecision
from embedseg_service.core.inference.padding import SIZE_MULTIPLE
from embedseg_service.core.inference.stream_net import StreamedNetwork, cancel_check, grow
from embedseg_service.core.inference.stream_tta import StreamedTTA
from embedseg_service.core.inference.tile_size import checked_tile_shape
from embedseg_service.core.inference.tta import TTACombine

WINDOW_VOXELS = 1 << 22
"""Most voxels of one window (core and margins) when the core is chosen automatically."""
DEFAULT_MARGIN = 32
"""Margin (pixels per axis) without the model's seed radius limit."""
MIN_MARGIN = 16


@dataclass
class ObjectStats:
    """Per written object: ``label``, ``voxel_count``, coordinate sums and inclusive bounding box (array order)."""

    labels: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)
    lows: list[np.ndarray] = field(default_factory=list)
    highs: list[np.ndarray] = field(default_factory=list)

    def rows(self, voxel_size: Sequence[float] | None = None) -> list[dict[str, Any]]:
        """Rows as :func:`embedseg_service.core.metrics.object_table` gives them (without ground truth)."""
        rows = []
        for label, count, total, low, high in zip(self.labels, self.counts, self.sums, self.lows, self.highs):
            row: dict[str, Any] = {"label": int(label), "voxel_count": int(count),
                                   "centroid": [float(s) / count for s in total],
                                   "bbox_min": [int(v) for v in low], "bbox_max": [int(v) for v in high]}  # fmt: skip
            if voxel_size is not None:
                row["centroid_physical"] = [c * float(v) for c, v in zip(row["centroid"], voxel_size)]
            rows.append(row)
        return rows


@dataclass
class StreamResult:
    """What a streamed segmentation wrote: ``n_objects``, the ``windows`` clustered, ``core`` and ``margin``
    (pixels per axis), owned objects skipped as ``duplicates`` and those ``cut`` by their window's edge."""

    n_objects: int
    windows: int
    core: tuple[int, ...]
    margin: tuple[int, ...]
    duplicates: int
    cut: int
    objects: ObjectStats


def default_margin(max_radius: float | Sequence[float] | None, dims: int) -> tuple[int, ...]:
    """Margin in pixels per axis: twice the seed radius limit (an object's diameter), rounded up to the
    8-pixel grid, at least :data:`MIN_MARGIN`; :data:`DEFAULT_MARGIN` without a limit."""
    if max_radius is None:
        return (DEFAULT_MARGIN,) * dims
    radius = [float(max_radius)] * dims if isinstance(max_radius, (int, float)) else [float(r) for r in max_radius]
    return tuple(max(MIN_MARGIN, SIZE_MULTIPLE * math.ceil(2 * r / SIZE_MULTIPLE)) for r in radius)


def auto_core(spatial: Sequence[int], margin: Sequence[int], window_voxels: int = WINDOW_VOXELS) -> tuple[int, ...]:
    """The largest near-cubic core (multiples of 8 pixels, whole axes where they are shorter) whose window
    holds at most ``window_voxels`` voxels (a core of 8 pixels at least)."""
    core = [0] * len(spatial)
    free = list(range(len(spatial)))
    fixed = 1.0
    while free:
        side = (window_voxels / fixed) ** (1 / len(free))
        short = [a for a in free if spatial[a] + 2 * margin[a] <= side or spatial[a] <= SIZE_MULTIPLE]
        if not short:
            break
        for a in short:
            core[a] = int(spatial[a])
            fixed *= min(spatial[a], spatial[a] + 2 * margin[a])
            free.remove(a)
    for a in free:
        side = (window_voxels / fixed) ** (1 / len(free))
        core[a] = max(SIZE_MULTIPLE, int(side - 2 * margin[a]) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return tuple(core)


class _Writer:
    """Writes the owned objects of each window into ``out`` and keeps their statistics."""

    def __init__(self, out: Any, spatial: Sequence[int]) -> None:
        self.out, self.spatial = out, tuple(spatial)
        self.next_label, self.duplicates, self.cut = 1, 0, 0
        self.stats = ObjectStats()

    def add(self, labels: np.ndarray, region: Region, core: Region) -> None:
        """Write the objects of ``labels`` (a window's, covering ``region``) whose centroid lies in ``core``
        (grown by half a pixel), each into the voxels no object holds yet, unless most of its voxels are held."""
        origin = np.array([r.start for r in region])
        owned: list[tuple[int, tuple[slice, ...], tuple[np.ndarray, ...]]] = []
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            where = np.nonzero(labels[box] == k)
            centroid = np.array([w.mean() + b.start for w, b in zip(where, box)]) + origin
            if all(c.start - 1 <= v < c.stop for v, c in zip(centroid, core)):
                owned.append((k, box, where))
        if not owned:
            return
        existing = np.asarray(self.out[region])
        changed = False
        for k, box, where in owned:
            held = existing[box][where]
            if 2 * int(np.count_nonzero(held)) > held.size:
                self.duplicates += 1
                continue
            free = tuple(w[held == 0] for w in where)
            existing[box][free] = self.next_label
            self._record(tuple(w + b.start + o for w, b, o in zip(free, box, origin)))
            self.cut += self._touches_edge(labels[box] == k, box, region)
            changed = True
        if changed:
            self.out[region] = existing

    def _record(self, where: tuple[np.ndarray, ...]) -> None:
        """Keep the statistics of the object just written at the voxels ``where`` (volume coordinates)."""
        self.stats.labels.append(self.next_label)
        self.stats.counts.append(int(where[0].size))
        self.stats.sums.append(np.array([float(w.sum()) for w in where]))
        self.stats.lows.append(np.array([int(w.min()) if w.size else 0 for w in where]))
        self.stats.highs.append(np.array([int(w.max()) if w.size else 0 for w in where]))
        self.next_label += 1

    def _touches_edge(self, mask: np.ndarray, box: tuple[slice, ...], region: Region) -> bool:
        """Whether an object (``mask`` within ``box`` of a window covering ``region``) touches the window's
        edge where that lies inside the volume."""
        for a, (b, r, n) in enumerate(zip(box, region, self.spatial)):
            size = r.stop - r.start
            if (r.start > 0 and b.start == 0 and np.take(mask, 0, axis=a).any()) or (
                r.stop < n and b.stop == size and np.take(mask, -1, axis=a).any()
            ):
                return True
        return False


def _windows(cells: Sequence[int], core_cells: Sequence[int], margin_cells: Sequence[int]) -> list[tuple[Region, ...]]:
    """(core, window) regions of a grid of ``cells``, cores in raster order."""
    return [(core, grow(core, list(margin_cells), cells)) for core in blocks(cells, core_cells)]


def segment_streamed(
    net: torch.nn.Module,
    source: VolumeSource,
    out: Any,
    *,
    step: Sequence[float],
    normalization: NormalizationSettings | None,
    fg_thresh: float = 0.5,
    seed_thresh: float = 0.9,
    min_size: int = 36,
    max_radius: float | Sequence[float] | None = None,
    tile: Sequence[int] | str | None = "auto",
    core: Sequence[int] | None = None,
    margin: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    tta: bool = False,
    combine: TTACombine | str = TTACombine.median,
    scratch: str | Path | None = None,
    progress: Callable[[int, int], bool | None] | None = None,
) -> StreamResult:
    """Write the instance labels of ``source`` ``(C, *S)`` into ``out`` (an array-like of shape ``S``, zeros,
    indexed by regions: a Zarr array, or a numpy array) window by window (module docstring).

    ``normalization``: the model's settings (statistics of the whole volume,
    :func:`embedseg_service.core.data.stream_stats.channel_scalings`; ``None``: the source is normalised
    float). ``tile``: the network's block in pixels as in :func:`embedseg_service.core.inference.predict.predict_raw`;
    ``core`` and ``margin``: pixels per axis (rounded up to the 8-pixel grid; defaults :func:`auto_core` and
    :func:`default_margin`). ``tta``: combine the 8 / 16 transforms (``combine``) as whole-volume prediction
    does (:mod:`embedseg_service.core.inference.stream_tta`). Other options as for
    :func:`embedseg_service.core.inference.predict.segment`.
    ``progress(done, total)`` after each block and window; ``False`` cancels.
    """
    dev = resolve_device(device)
    spatial = tuple(int(n) for n in source.shape[1:])
    margin_px = tuple(int(m) for m in (margin or default_margin(max_radius, len(spatial))))
    core_px = tuple(int(c) for c in (core or auto_core(spatial, margin_px)))
    scalings = channel_scalings(source, normalization) if normalization is not None else [None] * source.shape[0]
    block = [-(-t // SIZE_MULTIPLE) for t in checked_tile_shape(spatial, tile, 1, dev)]
    streamed: StreamedNetwork | StreamedTTA = (
        StreamedTTA(
            net,
            source,
            scalings,
            block=block,
            device=dev,
            precision=precision,
            scratch=scratch,
            combine=combine,
            fg_thresh=fg_thresh,
        )  # fmt: skip
        if tta
        else StreamedNetwork(net, source, scalings, block=block, device=dev, precision=precision, scratch=scratch)
    )
    try:
        cell = streamed.stages.cell
        core_cells = [max(1, -(-c // cell)) for c in core_px]
        margin_cells = [-(-m // cell) for m in margin_px]
        plan = _windows(streamed.cells, core_cells, margin_cells)
        tick = cancel_check(progress, streamed.build_steps() + len(plan))
        with torch.inference_mode():
            streamed.build(tick)
            writer = _Writer(out, spatial)
            for core_region, window in plan:
                region, core_px_region = streamed.image_region(window), streamed.image_region(core_region)
                labels = cluster(streamed.raw(window), step=step, fg_thresh=fg_thresh, seed_thresh=seed_thresh,
                                 min_size=min_size, max_radius=max_radius, device=dev)  # fmt: skip
                writer.add(drop_fragments(np.asarray(labels, dtype=np.int32), min_size), region, core_px_region)
                tick()
    finally:
        streamed.close()
    return StreamResult(writer.next_label - 1, len(plan), tuple(c * cell for c in core_cells),
                        tuple(m * cell for m in margin_cells), writer.duplicates, writer.cut, writer.stats)  # fmt: skip
