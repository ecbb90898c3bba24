"""Axis strings of images and volumes: an optional channel axis ``C`` first, then ``Z`` (3D), ``Y``, ``X``.

``axes`` is one of ``"YX"``, ``"ZYX"``, ``"CYX"``, ``"CZYX"``, one letter per dimension of
``shape``. Plain functions of the two (no numpy), so that the database rows of stored volumes
and the TIFF readers answer the same way. This module imports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


def has_channel_axis(axes: str) -> bool:
    """True when the first axis is a channel axis ``C``."""
    return axes.startswith("C")


def spatial_shape(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    """``shape`` without its channel axis: ``(Z, Y, X)`` or ``(Y, X)``."""
    return tuple(int(n) for n in (shape[1:] if has_channel_axis(axes) else shape))


def channel_count(shape: Sequence[int], axes: str) -> int:
    """Number of channels: the length of the channel axis, 1 without one."""
    return int(shape[0]) if has_channel_axis(axes) else 1


def spatial_dims(axes: str) -> int:
    """Number of spatial axes (2 or 3)."""
    return len(axes.replace("C", ""))
