"""Download answers for stored files: the file itself from a local folder, else streamed from the store."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

from fastapi.responses import FileResponse, Response, StreamingResponse

from embedseg_service.records.storage import LocalStorage, Storage

CHUNK = 1024 * 1024


def attachment(filename: str) -> str:
    """The ``Content-Disposition`` of a download named ``filename`` (RFC 5987 form for non-ASCII names)."""
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


def stored_file_response(storage: Storage, key: str, *, media_type: str, filename: str) -> Response:
    """The stored file ``key`` as a download named ``filename``.

    A :class:`LocalStorage` file is served as it lies (ranges, ETag); an object is streamed from the
    store in chunks of :data:`CHUNK` bytes with its ``Content-Length``, never copied to local disk.
    Raises :class:`~embedseg_service.records.storage.StorageError` when ``key`` is not stored.
    """
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.path_for(key), media_type=media_type, filename=filename)
    size = storage.size(key)
    source = storage.open_read(key)

    def chunks() -> Iterator[bytes]:
        with source:
            while chunk := source.read(CHUNK):
                yield chunk

    headers = {"content-length": str(size), "content-disposition": attachment(filename)}
    return StreamingResponse(chunks(), media_type=media_type, headers=headers)
