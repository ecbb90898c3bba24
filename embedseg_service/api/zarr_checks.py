"""Checks of an uploaded zipped OME-Zarr store before it is stored, as HTTP answers (:class:`UploadRejected`).

A refusal of :func:`embedseg_service.core.data.ome_zarr_checks.check_upload` becomes: 415 for an archive
that is not readable or holds no OME-Zarr image, 413 for more voxels, entries or unpacked bytes than
allowed, 422 for unsupported metadata, axes, pixel types or encodings (``unsupported OME-Zarr: ...``) and
for chunks that cannot be decoded, inflate beyond their size or hold values the policy refuses (the
checker's sentence as it is). Nothing here decodes more than one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from embedseg_service.api.uploads import UploadRejected
from embedseg_service.core.data.ome_zarr import (
    OmeZarrDamaged,
    OmeZarrError,
    OmeZarrInfo,
    OmeZarrTooLarge,
    OmeZarrTooManyVoxels,
    OmeZarrUnreadable,
)
from embedseg_service.core.data.ome_zarr_checks import check_upload


def zarr_rejection(error: OmeZarrError) -> UploadRejected:
    """The HTTP answer for a store the checks refused (see the module docstring)."""
    if isinstance(error, OmeZarrUnreadable):
        return UploadRejected(415, f"not a zipped OME-Zarr store: {error}")
    if isinstance(error, OmeZarrTooManyVoxels):
        return UploadRejected(413, f"{error}; send a smaller image, or raise EMBEDSEG_MAX_VOXELS")
    if isinstance(error, OmeZarrTooLarge):
        return UploadRejected(413, str(error))
    if isinstance(error, OmeZarrDamaged):
        return UploadRejected(422, str(error))
    return UploadRejected(422, f"unsupported OME-Zarr: {error}")


def inspect_zarr_upload(
    path: Path, *, max_voxels: int | None, labels: bool, check_info: Callable[[OmeZarrInfo], object]
) -> OmeZarrInfo:
    """The image of the uploaded zipped OME-Zarr store at ``path`` after every check; ``check_info(info)`` (the
    route's checks of the pixel type) runs before any chunk is read."""
    try:
        return check_upload(path, max_voxels=max_voxels, labels=labels, check_info=check_info)
    except OmeZarrError as error:
        raise zarr_rejection(error) from None
