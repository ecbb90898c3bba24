"""Checks of an uploaded TIFF before it is stored, as HTTP answers (:class:`UploadRejected`).

A refusal of the TIFF readers becomes: 415 for a file that is not a readable TIFF, 413 for one
that declares more voxels or pages than allowed (``EMBEDSEG_MAX_VOXELS``), 422 for an unsupported
layout (``unsupported TIFF: ...``) and for damaged pixel data or values the policy refuses (the
reader's sentence as it is). Nothing here decodes more than one strip or tile at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from embedseg_service.api.uploads import UploadRejected
from embedseg_service.core.data.io import TiffInfo, open_tiff, tiff_info
from embedseg_service.core.data.tiff_errors import (
    TiffDamaged,
    TiffError,
    TiffTooLarge,
    TiffUnreadable,
    reason,
)
from embedseg_service.core.data.tiff_limits import check_pixel_data
from embedseg_service.core.data.tiff_rewrite import rewrite_canonical
from embedseg_service.core.data.tiff_values import check_pixel_values


def rejection(error: TiffError) -> UploadRejected:
    """The HTTP answer for a TIFF the readers refused (see the module docstring)."""
    if isinstance(error, TiffUnreadable):
        return UploadRejected(415, f"unsupported TIFF: {error}")
    if isinstance(error, TiffTooLarge):
        return UploadRejected(413, f"{error}; send a smaller image, or raise EMBEDSEG_MAX_VOXELS")
    if isinstance(error, TiffDamaged):
        return UploadRejected(422, str(error))
    return UploadRejected(422, f"unsupported TIFF: {error}")


def inspect_upload(path: Path, *, axes: str | None, max_voxels: int | None) -> TiffInfo:
    """Layout of the uploaded TIFF at ``path`` from its header: page count, voxel budget, and where its
    strips and tiles lie (inside the file, none sharing bytes). Reads no pixel."""
    try:
        with open_tiff(path, axes=axes, max_voxels=max_voxels) as (tif, layout):
            try:
                check_pixel_data(tif, layout.series)
            except TiffError:
                raise
            except Exception as exc:  # the parser on a malformed page
                raise TiffUnreadable(f"not a readable TIFF file: {reason(exc)}") from None
            return tiff_info(tif, layout)
    except TiffError as error:
        raise rejection(error) from None


def check_upload_values(path: Path, *, axes: str | None, labels: bool) -> None:
    """Decode the uploaded TIFF a strip or tile at a time and refuse undecodable data or values the
    policy refuses: NaN/infinity in images, negative or noise-like labels
    (:mod:`embedseg_service.core.data.tiff_values`)."""
    try:
        with open_tiff(path, axes=axes) as (tif, layout):
            try:
                check_pixel_values(tif, layout, labels=labels)
            except TiffError:
                raise
            except Exception as exc:  # the parser on malformed pages or segments
                raise TiffDamaged(f"cannot decode the TIFF pixel data: {reason(exc)}") from None
    except TiffError as error:
        raise rejection(error) from None


def rewrite_upload(
    source: Path,
    target: str | os.PathLike,
    *,
    axes: str,
    voxel_size: Sequence[float] | None,
    max_voxels: int | None,
) -> None:
    """Write the uploaded TIFF in canonical axis order to ``target``, a plane at a time."""
    try:
        rewrite_canonical(source, target, axes=axes, voxel_size=voxel_size, max_voxels=max_voxels)
    except TiffError as error:
        raise rejection(error) from None
