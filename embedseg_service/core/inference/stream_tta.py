"""Test-time augmentation on a volume larger than memory (docs/method.md §7 and §11.5).

Whole-volume prediction with TTA pads the volume (:func:`embedseg_service.core.inference.padding.pad_to_multiple`),
runs the network on each transform of the padded volume, and combines the passes moved back
(:class:`embedseg_service.core.inference.tta.PassCombiner`) with one cell of margin around each block for the
seed-peak rule. Here every transform is a :class:`~embedseg_service.core.inference.stream_net.StreamedNetwork`
over the padded volume as the transform moves it (:class:`TransformedSource`, read a box at a time), with its
own grid files; :meth:`StreamedTTA.raw` decodes a window a block of cells at a time, each block grown by one cell
from every pass, moves the passes back and combines them. The raw outputs equal the whole volume's with TTA up to
float rounding.

Cost: the network runs once per transform (8 in 2D, 16 in 3D), the grid files take that many times the plain
path's disk, and combining holds every pass of one block (the network's tile) in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_service.core.data.stream_stats import Scaling
from embedseg_service.core.data.volume_source import Region, VolumeSource, blocks, read_padded
from embedseg_service.core.inference.padding import padding_before, round_up
from embedseg_service.core.inference.stream_net import StreamedNetwork, Tick, at, grow, image_region, within
from embedseg_service.core.inference.tta import PassCombiner, Transform, TTACombine, transforms


class TransformedSource:
    """``source`` ``(C, *S)`` padded as whole-volume prediction pads it, then moved by ``transform``; read a box
    at a time (the box of the padded volume it comes from, transformed)."""

    def __init__(self, source: VolumeSource, transform: Transform) -> None:
        spatial = tuple(int(n) for n in source.shape[1:])
        self.source, self.transform = source, transform
        self.before = padding_before(spatial)
        self.padded = tuple(round_up(n) for n in spatial)
        self.shape = (int(source.shape[0]), *transform.transformed_shape(self.padded))
        self.dtype = source.dtype

    def read(self, region: Region) -> np.ndarray:
        box = self.transform.map_box(region, self.padded, inverse=True)
        return self.transform.apply_array(read_padded(self.source, box, self.before))


class StreamedTTA:
    """The TTA-combined raw outputs of ``net`` over a volume source, a window of cells at a time; used as
    :class:`~embedseg_service.core.inference.stream_net.StreamedNetwork` is (``build``, ``raw``, ``image_region``)."""

    def __init__(self, net: torch.nn.Module, source: VolumeSource, scalings: Sequence[Scaling], *,
                 block: Sequence[int], device: torch.device, precision: Any = "fp32", scratch: str | Path | None = None,
                 combine: TTACombine | str = TTACombine.median, fg_thresh: float = 0.5) -> None:  # fmt: skip
        self.spatial = tuple(int(n) for n in source.shape[1:])
        self.chosen = transforms(len(self.spatial))
        self.rule, self.fg_thresh, self.device = TTACombine.parse(combine), float(fg_thresh), device
        if not 0.0 < self.fg_thresh < 1.0:
            raise ValueError(f"fg_thresh must lie strictly between 0 and 1, got {fg_thresh}")
        self.before = padding_before(self.spatial)
        self.nets: list[StreamedNetwork] = []
        try:
            for j, t in enumerate(self.chosen):  # each checks room for its grids and one per pass after it
                self.nets.append(StreamedNetwork(net, TransformedSource(source, t), scalings, device=device,
                                                 block=t.transformed_shape(block), precision=precision,
                                                 scratch=scratch, reserve_grids=len(self.chosen) - 1 - j,
                                                 tta=True))  # fmt: skip
        except BaseException:
            self.close()
            raise
        self.stages = self.nets[0].stages
        self.cells, self.block = self.nets[0].cells, self.nets[0].block  # the identity's: the padded volume's grid

    def build_steps(self) -> int:
        """Calls of ``tick`` :meth:`build` makes."""
        return sum(net.build_steps() for net in self.nets)

    def build(self, tick: Tick) -> None:
        """Encode every transformed volume and run the context stage into its grid files."""
        for net in self.nets:
            net.build(tick)

    def image_region(self, region: Region) -> Region:
        """The pixels of the volume (unpadded, clipped) a region of cells covers."""
        return image_region(region, self.stages.cell, self.before, self.spatial)

    def raw(self, window: Region) -> np.ndarray:
        """Combined raw outputs ``(C_out, *pixels)`` float32 of the volume's pixels in a window of cells, a block
        of cells at a time (every pass of one block in memory)."""
        target = self.image_region(window)
        out: np.ndarray | None = None
        for sub in blocks([r.stop - r.start for r in window], self.block):
            region = tuple(slice(w.start + s.start, w.start + s.stop) for w, s in zip(window, sub))
            combined = self._combined(region)
            if out is None:
                out = np.empty((combined.shape[0], *(t.stop - t.start for t in target)), dtype=np.float32)
            out[at(within(self.image_region(region), target))] = combined
        assert out is not None
        return out

    def _combined(self, region: Region) -> np.ndarray:
        """The passes of a region of cells moved back and combined; the volume's pixels in it."""
        cell = self.stages.cell
        outer = grow(region, 1, self.cells)  # one cell of margin for the seed peaks' local maximum
        combiner: PassCombiner | None = None
        for j, (t, net) in enumerate(zip(self.chosen, self.nets)):
            back = t.undo_output(torch.from_numpy(net.raw(t.map_box(outer, self.cells)))[None].to(self.device))
            if combiner is None:
                combiner = PassCombiner(self.rule, len(self.chosen), tuple(back.shape), back.device)
            combiner.add(j, 0, back)
        assert combiner is not None
        index = tuple(slice(p.start + b - o.start * cell, p.stop + b - o.start * cell)
                      for p, b, o in zip(self.image_region(region), self.before, outer))  # fmt: skip
        return combiner.result(self.fg_thresh)[0][at(index)].cpu().numpy()

    def close(self) -> None:
        """Remove every pass's grid files."""
        for net in self.nets:
            net.close()
