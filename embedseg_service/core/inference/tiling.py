"""Memory-bounded prediction whose raw outputs do not depend on the tile size (docs/method.md §11.3).

The network is run in three stages (:class:`NetworkStages`): a local encoder from the full-resolution
image down to a grid of cells (8 pixels per axis for the ERF-Net), a context stage on that cell grid
whose receptive field spans the whole image, and local decoders back to full resolution. The
rule is: every raw output is the one the network gives on the whole image.

- The image is reflect-padded to a multiple of 8, centred (:func:`pad_to_multiple`), as a whole-image
  prediction pads it.
- The local encoder runs on blocks of ``tile`` (on the 8-pixel grid), each read with a halo of
  :attr:`NetworkStages.encode_halo` cells that covers its receptive field; only the block's own
  cells are kept. The assembled cell grid is what the whole image gives.
- The context stage runs on the whole cell grid at once (1/64 of the pixels in 2D, 1/512 in 3D).
- The decoders run block by block with a halo of :attr:`NetworkStages.decode_halo` cells.

Convolutions zero-pad only at the image's true borders, which the blocks share with the whole
image, so tiled and whole outputs are equal up to float rounding, for any model and any tile: the
objects a user gets do not depend on a memory setting. With test-time augmentation the context
grid of every pass is kept (small), and each block is decoded for every pass, brought back and
combined (:class:`embedseg_service.core.inference.tta.PassCombiner`) with a margin of one cell for the seed-peak rule.
Peak memory grows with the tile, the input, the output and the cell grids, not with the volume's
activations at full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.defaults import DEFAULT_PRECISION, InferencePrecision
from embedseg_service.core.inference.padding import SIZE_MULTIPLE, crop_padding, pad_to_multiple
from embedseg_service.core.inference.tile_size import BYTES_PER_VOXEL, checked_tile_shape

MIN_BLOCK = 64
"""Smallest block side (pixels) of a tiled prediction: a smaller one would spend most of its work on halos."""

Progress = Callable[[int, int], "bool | None"]
"""Called as ``progress(tiles_done, tiles_total)`` after each tile; returning ``False`` cancels."""


class PredictionCancelled(RuntimeError):
    """Raised when a progress callback asks to stop."""


Module = Callable[[torch.Tensor], torch.Tensor]
Region = tuple[slice, ...]


@dataclass(frozen=True)
class NetworkStages:
    """A network split for exact tiling: ``decode(context(encode(x)))`` equals its forward pass.

    ``encode`` maps ``(B, C_in, *S)`` (sizes multiples of ``cell``) to ``(B, F, *S / cell)`` and
    reads at most ``encode_halo`` cells beyond a cell's own pixels; ``context`` maps the cell grid to
    a cell grid of the same shape and may read all of it; ``decode`` maps cells to ``(B, C_out, *S)``
    and reads at most ``decode_halo`` cells around the cells of an output pixel.
    """

    encode: Module
    context: Module
    decode: Module
    cell: int
    encode_halo: int
    decode_halo: int


def network_stages(net: torch.nn.Module) -> NetworkStages:
    """The stages of ``net`` (its ``stages()`` method); a network without one is a single stage run
    on the whole image at once (its outputs cannot be tiled exactly)."""
    stages = getattr(net, "stages", None)
    if callable(stages):
        return stages()

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    return NetworkStages(encode=net, context=identity, decode=identity, cell=1, encode_halo=0, decode_halo=0)


def _blocks(cells: Sequence[int], block: Sequence[int]) -> list[Region]:
    """Non-overlapping blocks of ``block`` cells covering a grid of ``cells`` (the last ones shorter)."""
    per_axis = [[slice(s, min(s + b, n)) for s in range(0, n, b)] for n, b in zip(cells, block)]
    return [tuple(r) for r in product(*per_axis)]


def _grow(region: Region, by: int, cells: Sequence[int]) -> Region:
    """``region`` widened by ``by`` cells on each side, clipped to the grid."""
    return tuple(slice(max(0, r.start - by), min(n, r.stop + by)) for r, n in zip(region, cells))


def _within(inner: Region, outer: Region, scale: int = 1) -> Region:
    """``inner`` relative to ``outer``'s start, in units of ``scale`` pixels per cell."""
    return tuple(slice((i.start - o.start) * scale, (i.stop - o.start) * scale) for i, o in zip(inner, outer))


def _all_of_batch(region: Region) -> tuple[slice, ...]:
    """Index of the spatial ``region`` in every image and channel of a ``(B, C, *S)`` tensor."""
    return (slice(None), slice(None), *region)


def _pixels(region: Region, scale: int) -> Region:
    return tuple(slice(r.start * scale, r.stop * scale) for r in region)


class _Staged:
    """Runs :class:`NetworkStages` block by block on one device (under autocast to ``autocast``, when given)."""

    def __init__(
        self, stages: NetworkStages, block: Sequence[int], autocast: torch.dtype | None, progress: Progress | None
    ) -> None:
        self.stages, self.block, self.autocast = stages, list(block), autocast
        self.progress, self.done, self.total = progress, 0, 0

    def _run(self, module: Module, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                return module(x).float()
        return module(x).float()

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None and self.progress(self.done, self.total) is False:
            raise PredictionCancelled(f"prediction cancelled after {self.done} of {self.total} tiles")

    def blocks(self, cells: Sequence[int]) -> list[Region]:
        return _blocks(cells, [min(b, n) for b, n in zip(self.block, cells)])

    def context_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The context stage's cell grid of ``x`` ``(B, C_in, *P)`` (``P`` multiples of the cell)."""
        st = self.stages
        cells = [n // st.cell for n in x.shape[2:]]
        regions = self.blocks(cells)
        if len(regions) == 1:
            grid = self._run(st.encode, x)
            self.tick()
            return self._run(st.context, grid)
        assembled: torch.Tensor | None = None
        for region in regions:
            outer = _grow(region, st.encode_halo, cells)
            part = self._run(st.encode, x[_all_of_batch(_pixels(outer, st.cell))])
            if assembled is None:
                assembled = part.new_empty((*part.shape[:2], *cells))
            assembled[_all_of_batch(region)] = part[_all_of_batch(_within(region, outer))]
            del part
            self.tick()
        assert assembled is not None
        return self._run(st.context, assembled)

    def decode(self, grid: torch.Tensor, region: Region) -> torch.Tensor:
        """Raw outputs ``(B, C_out, *region pixels)`` of the cells ``region`` of a context grid."""
        st = self.stages
        outer = _grow(region, st.decode_halo, grid.shape[2:])
        out = self._run(st.decode, grid[_all_of_batch(outer)])
        return out[_all_of_batch(_within(region, outer, st.cell))]


def _transformed_region(transform: Any, region: Region, cells: Sequence[int]) -> Region:
    """Where the cells ``region`` of a grid of ``cells`` lie after ``transform`` (a TTA transform)."""
    mask = torch.zeros((1, 1, *cells), dtype=torch.bool)
    index: tuple[Any, ...] = (0, 0, *region)
    mask[index] = True
    moved = transform.apply_image(mask)[0, 0]
    spans = []
    for axis in range(moved.dim()):
        other = tuple(a for a in range(moved.dim()) if a != axis)
        hit = torch.nonzero(moved.any(dim=other) if other else moved).flatten()
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


def _store(output: np.ndarray | None, y: torch.Tensor, region: Region, cell: int, spatial: Sequence[int]) -> np.ndarray:
    """Write the raw outputs ``y`` ``(B, C, *block pixels)`` of the cells ``region`` into ``output``
    ``(B, C, *spatial)`` (created on first use), without the padding beyond ``spatial``."""
    target = tuple(slice(r.start * cell, min(r.stop * cell, n)) for r, n in zip(region, spatial))
    index: tuple[Any, ...] = (slice(None), slice(None), *(slice(0, t.stop - t.start) for t in target))
    if output is None:
        if all(t.start == 0 and t.stop == n for t, n in zip(target, spatial)):  # one block: no copy
            return np.ascontiguousarray(y[index].cpu().numpy())
        output = np.empty((*y.shape[:2], *spatial), dtype=np.float32)
    output[_all_of_batch(target)] = y[index].cpu().numpy()
    return output


def _predict_plain(runner: _Staged, x: torch.Tensor, spatial: Sequence[int]) -> np.ndarray:
    """Raw outputs ``(B, C_out, *spatial)`` of padded images ``(B, C, *P)`` cropped to ``spatial``."""
    cell = runner.stages.cell
    regions = runner.blocks([n // cell for n in x.shape[2:]])
    runner.total = 2 * len(regions)
    grid = runner.context_grid(x)
    output: np.ndarray | None = None
    for region in regions:
        output = _store(output, runner.decode(grid, region), region, cell, spatial)
        runner.tick()
    assert output is not None
    return output


def _predict_tta(runner: _Staged, x: torch.Tensor, spatial: Sequence[int], options: dict[str, Any]) -> np.ndarray:
    """Raw outputs ``(B, C_out, *spatial)`` of padded images ``(B, C, *P)`` combined over the TTA passes,
    block by block, cropped to ``spatial``. A network call holds the passes of all ``B`` images for as
    many transforms as the TTA batch allows (one transform at least)."""
    from embedseg_service.core.inference.tta import DEFAULT_BATCH, PassCombiner, TTACombine, pass_settings, transforms

    fg_thresh = float(options.get("fg_thresh", 0.5))
    rule, batch = pass_settings(
        options.get("combine", TTACombine.median), fg_thresh, int(options.get("batch_size", DEFAULT_BATCH)), x
    )
    batch = max(1, batch // x.shape[0])
    cell, n_images = runner.stages.cell, x.shape[0]
    cells = [n // cell for n in x.shape[2:]]
    chosen = transforms(len(spatial))
    regions = runner.blocks(cells)
    groups = [[j for j, t in enumerate(chosen) if t.swaps_yx == odd] for odd in (False, True)]
    chunks = [g[i : i + batch] for g in groups for i in range(0, len(g), batch)]
    runner.total = sum(len(runner.blocks(chosen[c[0]].transformed_shape(cells))) for c in chunks) + len(regions)
    grids: list[torch.Tensor | None] = [None] * len(chosen)
    for chunk in chunks:
        found = runner.context_grid(torch.cat([chosen[j].apply_image(x) for j in chunk], dim=0))
        for i, j in enumerate(chunk):
            grids[j] = found[i * n_images : (i + 1) * n_images]
        del found
    output: np.ndarray | None = None
    for region in regions:
        outer = _grow(region, 1, cells)  # one cell of margin for the seed peaks' local maximum
        combiner = None
        for j, t in enumerate(chosen):
            grid = grids[j]
            assert grid is not None
            back = t.undo_output(runner.decode(grid, _transformed_region(t, outer, cells)))
            if combiner is None:
                combiner = PassCombiner(rule, len(chosen), tuple(back.shape), back.device)
            combiner.add(j, 0, back)
        assert combiner is not None
        inner = _all_of_batch(_within(region, outer, cell))
        output = _store(output, combiner.result(fg_thresh)[inner], region, cell, spatial)
        del combiner
        runner.tick()
    assert output is not None
    return output


def autocast_dtype(precision: InferencePrecision | str, device: torch.device) -> torch.dtype | None:
    """The dtype the network autocasts to for ``precision`` on ``device`` (``None``: float32);
    ``ValueError`` for ``fp16`` off CUDA."""
    chosen = InferencePrecision.parse(precision)
    if chosen is InferencePrecision.fp32:
        return None
    if chosen is InferencePrecision.fp16 and device.type != "cuda":
        raise ValueError(f"inference precision fp16 needs a CUDA device, not {device.type}; use fp32 or bf16")
    return torch.float16 if chosen is InferencePrecision.fp16 else torch.bfloat16


def predict_tiled(
    net: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    tile: Sequence[int] | str | None = "auto",
    device: torch.device | str | None = None,
    tta: bool = False,
    tta_options: dict[str, Any] | None = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    progress: Progress | None = None,
) -> np.ndarray:
    """Raw outputs ``(C_out, *S)`` float32 (numpy, CPU) of ``net`` over ``image`` ``(C_in, *S)``.

    Equal, up to float rounding, to ``net`` run on the whole image (reflect-padded to a multiple of 8
    by :func:`pad_to_multiple`), whatever ``tile`` is (module docstring). ``tile``: block shape in array order
    (rounded up to the 8-pixel grid, at least :data:`MIN_BLOCK`), ``"auto"`` (from the device's
    free memory) or ``None`` (one block). ``tta`` combines the 8 / 16 flips and rotations (``tta_options``: ``combine``,
    ``fg_thresh``, ``batch_size``, as for :func:`embedseg_service.core.inference.tta.predict_tta`). ``precision``:
    the network's number format (:func:`autocast_dtype`). ``progress(done, total)`` is called after every block
    and stage; returning ``False`` raises :class:`PredictionCancelled`. ``net`` must be in eval mode; call
    under ``torch.inference_mode()`` or ``torch.no_grad()``.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, Y, X) or (C, Z, Y, X), got shape {tuple(image.shape)}")
    return predict_tiled_batch(net, image[None], tile=tile, device=device, tta=tta, tta_options=tta_options,
                               precision=precision, progress=progress)[0]  # fmt: skip


def predict_tiled_batch(
    net: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    tile: Sequence[int] | str | None = "auto",
    device: torch.device | str | None = None,
    tta: bool = False,
    tta_options: dict[str, Any] | None = None,
    precision: InferencePrecision | str = DEFAULT_PRECISION,
    progress: Progress | None = None,
) -> np.ndarray:
    """Raw outputs ``(B, C_out, *S)`` float32 (numpy, CPU) of ``net`` over ``images`` ``(B, C_in, *S)``, run
    through the network together; options as for :func:`predict_tiled`, whose outputs each image's equal up
    to float rounding (the CPU may pick other convolution kernels for a batch than for one image)."""
    dev = resolve_device(device)
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (B, C, Y, X) or (B, C, Z, Y, X), got shape {tuple(images.shape)}")
    n_images, spatial = int(images.shape[0]), tuple(int(s) for s in images.shape[2:])
    options = dict(tta_options or {})
    batch = n_images
    if tta:
        from embedseg_service.core.inference.tta import DEFAULT_BATCH, TTACombine, combine_bytes_per_voxel

        # the passes' combination holds memory of its own: count it as extra images of the batch
        extra = combine_bytes_per_voxel(len(spatial), options.get("combine", TTACombine.median))
        batch = max(n_images, int(options.get("batch_size", DEFAULT_BATCH)))
        batch += n_images * math.ceil(extra / BYTES_PER_VOXEL[len(spatial)])
    stages = network_stages(net)
    tile_shape = checked_tile_shape(spatial, tile, batch, dev)
    chunk = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = pad_to_multiple(chunk.to(device=dev, dtype=torch.float32))
    if SIZE_MULTIPLE % stages.cell:
        raise ValueError(f"the network's cell ({stages.cell} pixels) must divide {SIZE_MULTIPLE}")
    block = [max(-(-t // stages.cell), MIN_BLOCK // stages.cell) for t in tile_shape]
    if stages.cell == 1 and stages.encode_halo == stages.decode_halo == 0:  # one stage: the whole image
        block = list(x.shape[2:])
    runner = _Staged(stages, block, autocast_dtype(precision, dev), progress)
    padded = tuple(int(n) for n in x.shape[2:])
    if tta:
        return crop_padding(_predict_tta(runner, x, padded, options), spatial)
    return crop_padding(_predict_plain(runner, x, padded), spatial)
