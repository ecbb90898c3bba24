"""Checks of the pixel values of a TIFF before it is accepted, in bounded memory (torch-free).

The policy, applied by :func:`check_pixel_values` to every pixel (decoded strip by strip through
:func:`embedseg_service.core.data.tiff_pixels.iter_blocks`):

* Compressed pixel data must decode (a codec this installation lacks, or corrupt data, is refused).
* Floating-point images hold no NaN and no infinity (the message counts each).
* Label images hold no negative value (0 is background, objects are positive ids).
* Label images hold objects, not noise: among pairs of horizontally neighbouring voxels that are
  both foreground, at most half may join two different ids once there are at least
  :data:`MIN_PAIRS_FOR_NOISE` such pairs. In a label image neighbours differ only where two objects
  touch; in noise, an intensity image or a probability map they nearly all differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tifffile

from embedseg_service.core.data.io import TiffLayout
from embedseg_service.core.data.tiff_errors import TiffDamaged
from embedseg_service.core.data.tiff_pixels import iter_blocks

MIN_PAIRS_FOR_NOISE = 1000
"""Foreground neighbour pairs needed before a label image can be judged to be noise."""

MAX_DIFFERENT_FRACTION = 0.5
"""Largest fraction of foreground neighbour pairs with two different ids in a label image."""


@dataclass
class ValueCounts:
    """What a scan of every pixel found."""

    nan: int = 0
    inf: int = 0
    negative: int = 0
    foreground_pairs: int = 0
    different_pairs: int = 0

    def add(self, block: np.ndarray, *, floats: bool, labels: bool) -> None:
        """Count the values of one 2D block of rows."""
        if floats:
            self.nan += int(np.count_nonzero(np.isnan(block)))
            self.inf += int(np.count_nonzero(np.isinf(block)))
        if not labels:
            return
        if np.issubdtype(block.dtype, np.signedinteger):
            self.negative += int(np.count_nonzero(block < 0))
        left, right = block[:, :-1], block[:, 1:]
        both = (left != 0) & (right != 0)
        self.foreground_pairs += int(np.count_nonzero(both))
        self.different_pairs += int(np.count_nonzero(both & (left != right)))


def scan_values(tif: tifffile.TiffFile, layout: TiffLayout, *, labels: bool) -> ValueCounts:
    """Count NaN/infinite values (float images) or negative ids and neighbour pairs (labels) over every pixel."""
    counts = ValueCounts()
    floats = np.issubdtype(layout.dtype, np.floating)
    for block in iter_blocks(tif, layout):
        counts.add(block, floats=floats, labels=labels)
    return counts


def check_pixel_values(tif: tifffile.TiffFile, layout: TiffLayout, *, labels: bool) -> None:
    """Refuse pixel values the policy of the module docstring does not allow, with :class:`TiffDamaged`.

    Uncompressed integer images are not read (nothing to check); everything else is decoded once,
    a strip or tile at a time.
    """
    floats = np.issubdtype(layout.dtype, np.floating)
    compressed = int(layout.series.keyframe.compression) != 1
    if not (labels or floats or compressed):
        return
    counts = scan_values(tif, layout, labels=labels)
    problem = value_problem(counts)
    if problem is not None:
        raise TiffDamaged(problem)


def value_problem(counts: ValueCounts) -> str | None:
    """What the policy of the module docstring refuses in what a scan found (``None``: nothing)."""
    if counts.nan or counts.inf:
        return (
            f"the image holds {counts.nan} NaN and {counts.inf} infinite value(s); replace them with finite "
            "numbers (e.g. 0) and upload it again"
        )
    if counts.negative:
        return (
            f"the label image holds {counts.negative} negative value(s); label ids must be >= 0 "
            "(0 = background, objects 1, 2, ...)"
        )
    pairs, different = counts.foreground_pairs, counts.different_pairs
    if pairs >= MIN_PAIRS_FOR_NOISE and different > MAX_DIFFERENT_FRACTION * pairs:
        return (
            f"this does not look like a label image: {100 * different / pairs:.0f}% of its {pairs} pairs of "
            "neighbouring foreground voxels have different ids, where objects of one id each would give few; "
            "upload it with kind=image, or upload the instance labels (0 = background, one id per object)"
        )
    return None
