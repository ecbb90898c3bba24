"""The staged network (docs/method.md §11.3) run on a volume larger than memory (docs/method.md §11.5).

The exact tiling of :mod:`embedseg_service.core.inference.tiling` keeps the 1/8-scale cell grid of the whole
image in memory for the context stage. Here the grid lives in temporary files instead, and every stage
reads and writes it a block at a time:

1. the local encoder runs on blocks of cells, each read from the volume (mirrored at its borders as
   :func:`embedseg_service.core.inference.padding.pad_to_multiple` pads, and normalised with the whole
   volume's statistics) with the encoder's halo; each block's own cells are stored;
2. the context stage runs one step at a time (a network's ``context_steps()``: each step's module and
   the cells it reads around a cell, e.g. ``1 + dilation`` for a dilated ERF-Net block), block by block
   with that halo, from one stored grid into the other; a network without ``context_steps`` runs its
   context on the whole grid at once;
3. :meth:`StreamedNetwork.raw` decodes any window of cells, block by block with the decoder's halo.

Every convolution zero-pads only at the padded volume's borders, which blocks share with the whole, so
the raw outputs are the whole volume's up to float rounding. Memory: one block with its halo per stage,
and the decoded window. Disk: two grids while the context stage runs, one after; the first encoded block
checks that the scratch folder has room (:class:`ScratchSpaceError` otherwise).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_service.core.data.normalization import scale_intensities
from embedseg_service.core.data.stream_stats import Scaling
from embedseg_service.core.data.volume_source import Region, VolumeSource, blocks, read_padded
from embedseg_service.core.inference.padding import SIZE_MULTIPLE, padding_before, round_up
from embedseg_service.core.inference.tiling import (
    NetworkStages,
    PredictionCancelled,
    autocast_dtype,
    network_stages,
)

Tick = Callable[[], None]
ContextStep = tuple[Callable[[torch.Tensor], torch.Tensor], int]


def context_steps(net: torch.nn.Module) -> list[ContextStep] | None:
    """The network's context stage as steps ``(module, halo in cells)`` (its ``context_steps()``), or ``None``."""
    steps = getattr(net, "context_steps", None)
    return list(steps()) if callable(steps) else None


def grow(region: Region, by: Sequence[int] | int, limit: Sequence[int]) -> Region:
    """``region`` widened by ``by`` on each side (per axis or for all), clipped to ``[0, limit)``."""
    widths = [by] * len(region) if isinstance(by, int) else list(by)
    return tuple(slice(max(0, r.start - w), min(n, r.stop + w)) for r, w, n in zip(region, widths, limit))


def within(inner: Region, outer: Region, scale: int = 1) -> Region:
    """``inner`` relative to ``outer``'s start, times ``scale``."""
    return tuple(slice((i.start - o.start) * scale, (i.stop - o.start) * scale) for i, o in zip(inner, outer))


ALL = slice(None)


def at(region: Sequence[slice], *lead: Any) -> tuple[Any, ...]:
    """The index ``(*lead, *region)``, by default every channel of a ``(C, *S)`` array at ``region``."""
    return (*(lead or (ALL,)), *region)


def pixels(region: Region, cell: int) -> Region:
    """The pixels of a region of cells."""
    return tuple(slice(r.start * cell, r.stop * cell) for r in region)


def image_region(region: Region, cell: int, before: Sequence[int], spatial: Sequence[int]) -> Region:
    """The pixels of a volume of shape ``spatial``, padded by ``before`` pixels, that a region of cells covers
    (unpadded, clipped to the volume)."""
    return tuple(slice(max(0, r.start * cell - b), min(n, r.stop * cell - b))
                 for r, b, n in zip(region, before, spatial))  # fmt: skip


class ScratchSpaceError(OSError):
    """The scratch folder has no room for the cell grids of a streamed prediction."""


def check_scratch_space(folder: Path, needed: int, what: str, *, tta: bool = False) -> None:
    """Raise :class:`ScratchSpaceError` unless ``folder``'s file system has ``needed`` bytes free; the message
    says how to make room (``tta``: the grids are those of test-time augmentation's passes)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        remedy = "predict the volume without test-time augmentation" if tta else "set TMPDIR to a larger disk"
        raise ScratchSpaceError(
            f"{what} need about {_size(needed)} of scratch space in {folder}, but {_size(free)} are free; free "
            f"space there, or {remedy}"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


class _GridFiles:
    """Two cell grids ``(F, *cells)`` float32 in temporary files, one raw file per block of cells (written whole;
    read by any region)."""

    def __init__(self, folder: Path, cells: Sequence[int], block: Sequence[int]) -> None:
        self.folder, self.cells, self.block = folder, tuple(cells), tuple(block)
        self.channels = 0
        self.current = 0

    def create(self, channels: int) -> None:
        self.channels = channels
        for name in ("a", "b"):
            (self.folder / name).mkdir()

    def _file(self, grid: int, index: Sequence[int]) -> Path:
        return self.folder / "ab"[grid] / "_".join(str(i) for i in index)

    def read(self, region: Region) -> np.ndarray:
        out = np.empty((self.channels, *(r.stop - r.start for r in region)), dtype=np.float32)
        first = [r.start // b for r, b in zip(region, self.block)]
        last = [(r.stop - 1) // b for r, b in zip(region, self.block)]
        for index in np.ndindex(*(hi - lo + 1 for lo, hi in zip(first, last))):
            number = [i + lo for i, lo in zip(index, first)]
            chunk = tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(number, self.block, self.cells))
            data = np.fromfile(self._file(self.current, number), dtype=np.float32)
            data = data.reshape(self.channels, *(c.stop - c.start for c in chunk))
            part = tuple(slice(max(r.start, c.start), min(r.stop, c.stop)) for r, c in zip(region, chunk))
            out[at(within(part, region))] = data[at(within(part, chunk))]
        return out

    def write(self, region: Region, values: np.ndarray, *, other: bool = False) -> None:
        """Store the block ``region`` (one whole block of the grid)."""
        index = [r.start // b for r, b in zip(region, self.block)]
        np.ascontiguousarray(values, dtype=np.float32).tofile(self._file(self.current ^ int(other), index))

    def swap(self) -> None:
        self.current ^= 1

    def drop_other(self) -> None:
        """Remove the files of the grid not read any more (the context stage is done)."""
        shutil.rmtree(self.folder / "ab"[self.current ^ 1], ignore_errors=True)


class StreamedNetwork:
    """The raw outputs of ``net`` over a :class:`~embedseg_service.core.data.volume_source.VolumeSource`,
    a window at a time (module docstring). ``scalings``: per channel ``(offset, spread)`` or ``None``
    (:func:`embedseg_service.core.data.stream_stats.channel_scalings`); ``block``: cells per axis of one
    block; ``scratch``: folder for the grid files (removed by :meth:`close`); ``reserve_grids``: grids of
    later passes to find room for too; ``tta``: this is one pass of test-time augmentation."""

    def __init__(self, net: torch.nn.Module, source: VolumeSource, scalings: Sequence[Scaling], *,
                 block: Sequence[int], device: torch.device, precision: Any = "fp32",
                 scratch: str | Path | None = None, reserve_grids: int = 0, tta: bool = False) -> None:  # fmt: skip
        self.net, self.source, self.scalings, self.device = net, source, list(scalings), device
        self.reserve_grids, self.tta = reserve_grids, tta
        self.stages: NetworkStages = network_stages(net)
        if SIZE_MULTIPLE % self.stages.cell:
            raise ValueError(f"the network's cell ({self.stages.cell} pixels) must divide {SIZE_MULTIPLE}")
        self.spatial = tuple(int(n) for n in source.shape[1:])
        self.before = padding_before(self.spatial)
        self.cells = tuple(round_up(n) // self.stages.cell for n in self.spatial)
        self.block = tuple(max(1, min(int(b), c)) for b, c in zip(block, self.cells))
        self.autocast = autocast_dtype(precision, device)
        self._folder = Path(tempfile.mkdtemp(prefix="embedseg-grid-", dir=scratch))
        self.grid = _GridFiles(self._folder, self.cells, self.block)

    def _run(self, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                return module(x).float()
        return module(x).float()

    def _input(self, region: Region) -> torch.Tensor:
        """The normalised, padded input ``(1, C, *pixels)`` of a region of cells."""
        data = read_padded(self.source, pixels(region, self.stages.cell), self.before)
        scaled = [data[c].astype(np.float32) if s is None else scale_intensities(data[c], *s)
                  for c, s in enumerate(self.scalings)]  # fmt: skip
        return torch.from_numpy(np.stack(scaled))[None].to(self.device)

    def block_count(self) -> int:
        """Blocks of one pass over the grid."""
        return len(list(blocks(self.cells, self.block)))

    def passes(self) -> int:
        """Passes over the grid :meth:`build` makes (the encoder's and one per context step)."""
        steps = context_steps(self.net)
        return 1 + (len(steps) if steps is not None else 0)

    def build_steps(self) -> int:
        """Calls of ``tick`` :meth:`build` makes."""
        return self.passes() * self.block_count()

    def build(self, tick: Tick) -> None:
        """Encode the volume and run the context stage into the grid files; ``tick()`` after each block."""
        st = self.stages
        for region in blocks(self.cells, self.block):
            outer = grow(region, st.encode_halo, self.cells)
            part = self._run(st.encode, self._input(outer))
            if not self.grid.channels:
                self._check_space(int(part.shape[1]))
                self.grid.create(int(part.shape[1]))
            self.grid.write(region, part[at(within(region, outer), 0, ALL)].cpu().numpy())
            tick()
        steps = context_steps(self.net)
        if steps is None:
            whole = tuple(slice(0, c) for c in self.cells)
            grid = torch.from_numpy(self.grid.read(whole))[None].to(self.device)
            context = self._run(st.context, grid)[0].cpu().numpy()
            for region in blocks(self.cells, self.block):
                self.grid.write(region, context[at(region)])
            return
        for module, halo in steps:
            for region in blocks(self.cells, self.block):
                outer = grow(region, halo, self.cells)
                grid = torch.from_numpy(self.grid.read(outer))[None].to(self.device)
                out = self._run(module, grid)[at(within(region, outer), 0, ALL)]
                self.grid.write(region, out.cpu().numpy(), other=True)
                tick()
            self.grid.swap()
        self.grid.drop_other()

    def _check_space(self, channels: int) -> None:
        """Before the first grid file: room for this network's two grids and ``reserve_grids`` more."""
        needed = (2 + self.reserve_grids) * 4 * channels * math.prod(self.cells)
        check_scratch_space(
            self._folder.parent,
            needed,
            f"the cell grids ({channels} channels of {list(self.cells)} cells)",
            tta=self.tta,
        )

    def image_region(self, region: Region) -> Region:
        """The pixels of the volume (unpadded, clipped) a region of cells covers."""
        return image_region(region, self.stages.cell, self.before, self.spatial)

    def raw(self, window: Region) -> np.ndarray:
        """Raw outputs ``(C_out, *pixels)`` float32 of the volume's pixels in a window of cells
        (:meth:`image_region`), decoded block by block."""
        st = self.stages
        target = self.image_region(window)
        out: np.ndarray | None = None
        for sub in blocks([r.stop - r.start for r in window], self.block):
            region = tuple(slice(w.start + s.start, w.start + s.stop) for w, s in zip(window, sub))
            outer = grow(region, st.decode_halo, self.cells)
            grid = torch.from_numpy(self.grid.read(outer))[None].to(self.device)
            y = self._run(st.decode, grid)[at(within(region, outer, st.cell), 0, ALL)]
            here = self.image_region(region)
            if out is None:
                out = np.empty((int(y.shape[0]), *(t.stop - t.start for t in target)), dtype=np.float32)
            source = tuple(slice(h.start + b - r.start * st.cell, h.stop + b - r.start * st.cell)
                           for h, b, r in zip(here, self.before, region))  # fmt: skip
            out[at(within(here, target))] = y[at(source)].cpu().numpy()
        assert out is not None
        return out

    def close(self) -> None:
        """Remove the grid files."""
        shutil.rmtree(self._folder, ignore_errors=True)


def cancel_check(progress: Callable[[int, int], bool | None] | None, total: int) -> Tick:
    """A ``tick()`` that counts steps and raises :class:`PredictionCancelled` when ``progress(done, total)``
    returns ``False``."""
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None and progress(done[0], total) is False:
            raise PredictionCancelled(f"prediction cancelled after {done[0]} of {total} steps")

    return tick
