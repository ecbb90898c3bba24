"""Why a TIFF is refused: one exception class per kind of problem, each a ``ValueError`` whose message
says what is wrong (torch-free, imports nothing of ours).

* :class:`TiffUnreadable`: not a TIFF, or a header/IFD structure the parser cannot follow.
* :class:`TiffUnsupported`: a readable TIFF whose layout, axes or pixel type is not supported.
* :class:`TiffTooLarge`: the header declares more voxels or pages than the limit allows.
* :class:`TiffDamaged`: the pixel data is truncated, shared between strips/tiles, inflates beyond
  its declared size, cannot be decoded, or holds values the image kind does not allow.
"""

from __future__ import annotations


class TiffError(ValueError):
    """A TIFF that is refused; the message says what is wrong."""


class TiffUnreadable(TiffError):
    """Not a TIFF, or a header the parser cannot follow."""


class TiffUnsupported(TiffError):
    """A readable TIFF whose layout, axes or pixel type is not supported."""


class TiffTooLarge(TiffError):
    """The header declares more voxels or pages than allowed."""


class TiffDamaged(TiffError):
    """The pixel data cannot be trusted or decoded (truncated, shared, inflating, undecodable, bad values)."""


def reason(error: BaseException) -> str:
    """A one-line description of ``error`` for a message: its text (first line, at most 200 characters)
    followed by its type (``struct.error``) when that is not a ``ValueError``, or its type alone when it has
    no text."""
    kind = type(error)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    lines = str(error).strip().splitlines()
    text = lines[0][:200] if lines else ""
    if not text:
        return name
    return text if isinstance(error, ValueError) else f"{text} ({name})"
