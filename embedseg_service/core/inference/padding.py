"""Padding of an image to the network's 8-pixel grid, centred as in training, and cropping of its outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SIZE_MULTIPLE = 8


def round_up(n: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-int(n) // multiple) * multiple


def reflect_pad_end(x: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Pad the spatial axes of ``x`` ``(B, C, *S)`` at their end up to ``target`` by mirroring.

    Pads longer than an axis mirror repeatedly (like ``numpy.pad(mode="reflect")``); a size-1 axis
    is repeated.
    """
    spatial = x.dim() - 2
    if len(target) != spatial:
        raise ValueError(f"target needs {spatial} sizes, got {tuple(target)}")
    for axis in range(spatial):
        dim = 2 + axis
        while x.shape[dim] < target[axis]:
            size = x.shape[dim]
            if size == 1:
                x = torch.cat([x] * int(target[axis]), dim=dim)
                break
            step = min(target[axis] - size, size - 1)
            mirrored = torch.flip(x.narrow(dim, size - 1 - step, step), dims=(dim,))
            x = torch.cat([x, mirrored], dim=dim)
    return x


def padding_before(spatial: Sequence[int], multiple: int = SIZE_MULTIPLE) -> tuple[int, ...]:
    """Pixels that :func:`pad_to_multiple` adds before the image on each axis: half the padding
    (rounded down), the rest goes after it."""
    return tuple((round_up(n, multiple) - int(n)) // 2 for n in spatial)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad the spatial axes of ``(B, C, *S)`` to multiples of ``multiple``, centring the image.

    Training crops of an image shorter than the crop (a 5-slice stack under 8-slice crops) hold it
    centred between mirrored slices (:mod:`embedseg_service.core.data.crops`); the network learns that layout, so a
    whole image is padded the same way. :func:`crop_padding` takes the image's part of an output back.
    """
    spatial = x.shape[2:]
    before = padding_before(spatial, multiple)
    flipped = tuple(range(2, x.dim()))
    x = torch.flip(reflect_pad_end(torch.flip(x, flipped), [n + b for n, b in zip(spatial, before)]), flipped)
    return reflect_pad_end(x, [round_up(n, multiple) for n in spatial])


def crop_padding(y: np.ndarray, spatial: Sequence[int], multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """The part of ``y`` ``(..., *P)`` (e.g. ``(C, *P)`` or ``(B, C, *P)``), computed on :func:`pad_to_multiple`'s
    output, that covers the image ``spatial`` (a view)."""
    before = padding_before(spatial, multiple)
    index: tuple[Any, ...] = (Ellipsis, *(slice(b, b + int(n)) for b, n in zip(before, spatial)))
    return y[index]
