"""Helpers for API tests: synthetic TIFF bytes and volume uploads."""

from __future__ import annotations

import io

import numpy as np
import tifffile


def tiff_bytes(data: np.ndarray, **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    """The bytes of a TIFF file holding ``data`` (tifffile.imwrite keyword arguments pass through)."""
    buffer = io.BytesIO()
    if not kwargs.get("imagej"):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(buffer, data, **kwargs)
    return buffer.getvalue()


def upload(client, content: bytes, filename: str = "img.tif", **fields):  # type: ignore[no-untyped-def]
    """POST a file (and form fields) to /api/v1/volumes."""
    return client.post(
        "/api/v1/volumes",
        files={"file": (filename, content, "image/tiff")},
        data={k: str(v) for k, v in fields.items()},
    )
