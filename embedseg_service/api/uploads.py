"""Streaming multipart upload: the file part goes to storage chunk by chunk, never whole in memory.

The request body is fed to python-multipart's push parser as it arrives; file bytes are
buffered up to ``chunk_bytes`` and handed to two threads, one hashing (SHA-256) and one writing,
through short bounded queues, so parsing, hashing and disk writes overlap while memory stays
bounded. The few text fields the caller names are collected (each at most ``MAX_FIELD_BYTES``);
any other part is refused at its headers. Every part counts toward the size limit. Any rejection
aborts the temporary file, so nothing partial is left behind.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from embedseg_service.records.storage import PendingWrite, Storage

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 64 * 1024
"""Longest text field (413 beyond)."""
MAX_HEADER_BYTES = 8 * 1024
"""Most header bytes of one multipart part (400 beyond)."""
MULTIPART_SLACK = 1024 * 1024
"""Bytes a body may hold beyond its parts' data (boundaries, part headers)."""
PIPELINE_DEPTH = 4


class UploadRejected(Exception):
    """The upload cannot be accepted; ``status`` and ``detail`` are the HTTP answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def too_large(max_bytes: int) -> UploadRejected:
    return UploadRejected(
        413,
        f"upload exceeds the limit of {max_bytes} bytes ({human_bytes(max_bytes)}); "
        "send a smaller file or raise EMBEDSEG_MAX_UPLOAD_BYTES",
    )


class _Pipeline:
    """Hash and write chunks of one file on two threads, in order, with at most ``depth`` chunks queued each."""

    def __init__(self, pending: PendingWrite, depth: int = PIPELINE_DEPTH) -> None:
        self.pending = pending
        self.hash = hashlib.sha256()
        self.error: BaseException | None = None
        self.stopped = False
        self.queues: list[queue.Queue[bytes | None]] = [queue.Queue(depth), queue.Queue(depth)]
        self.threads = [
            threading.Thread(target=self._consume, args=(q, step), daemon=True, name=f"upload-{name}")
            for q, step, name in zip(self.queues, (self.hash.update, pending.write_unhashed), ("hash", "write"))
        ]
        for thread in self.threads:
            thread.start()

    def _consume(self, items: queue.Queue[bytes | None], step: Callable[[bytes], object]) -> None:
        while (item := items.get()) is not None:
            if self.error is None and not self.stopped:
                try:
                    step(item)
                except BaseException as error:  # reported to the request by put/finish
                    self.error = error

    async def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        for items in self.queues:
            try:
                items.put_nowait(data)
            except queue.Full:
                await run_in_threadpool(items.put, data)

    def _join(self) -> None:
        for items in self.queues:
            items.put(None)
        for thread in self.threads:
            thread.join()

    async def finish(self) -> None:
        """Wait until every chunk is hashed and written; record the digest."""
        await run_in_threadpool(self._join)
        if self.error is not None:
            raise self.error
        self.pending.set_sha256(self.hash.hexdigest())

    def stop(self) -> None:
        """Drop what is queued and end the threads (before the temporary file is aborted)."""
        self.stopped = True
        self._join()


UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed multipart body"},
    413: {"description": "Larger than EMBEDSEG_MAX_UPLOAD_BYTES, a storage quota or the voxel budget"},
    507: {"description": "The server's storage is full; nothing stored was lost"},
}
"""The error answers every upload route shares (each adds its own 415 and 422)."""


@dataclass
class ReceivedUpload:
    """A received file (still pending: commit or abort it), the text fields sent with it, and the voxel
    budget the caller asked its pixels to be checked against (``None``: no budget)."""

    pending: PendingWrite
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)
    max_voxels: int | None = None


@dataclass
class _Form:
    """Parser callbacks and what they collected: the file part's bytes (buffered until flushed), the
    text fields, and the first error found (raised by the caller between chunks).

    Every part's data counts toward ``max_bytes``; a part is judged at its headers, before its data
    is read: the file part, or one of the ``allowed`` text fields, each at most once.
    """

    file_field: str
    max_bytes: int
    allowed: tuple[str, ...]
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    header_bytes: int = 0
    part_name: str | None = None
    in_file: bool = False
    file_seen: bool = False
    filename: str | None = None
    field_value: bytearray = field(default_factory=bytearray)
    fields: dict[str, str] = field(default_factory=dict)
    buffer: list[bytes] = field(default_factory=list)
    buffered: int = 0
    data_bytes: int = 0
    error: UploadRejected | None = None
    ended: bool = False

    def fail(self, error: UploadRejected) -> None:
        """Keep the first error; drop what is buffered."""
        self.error = self.error or error
        self.buffer.clear()
        self.buffered = 0

    def on_part_begin(self) -> None:
        self.headers.clear()
        self.header_bytes = 0
        self.part_name = None
        self.in_file = False
        self.field_value.clear()

    def _header_bytes(self, size: int) -> bool:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            self.fail(UploadRejected(400, f"a multipart part has more than {MAX_HEADER_BYTES} bytes of headers"))
        return self.error is None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        if self._header_bytes(end - start):
            self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header_bytes(end - start):
            self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        if self.error is not None:
            return
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.part_name = name
        filename = options.get(b"filename")
        if name == self.file_field:
            if self.file_seen:
                self.fail(
                    UploadRejected(422, f"send exactly one file per request in the form field '{self.file_field}'")
                )
            self.in_file = True
            self.file_seen = True
            self.filename = filename.decode("utf-8", "replace") if filename else None
        elif filename is not None:
            self.fail(self._no_file())
        elif name not in self.allowed:
            self.fail(
                UploadRejected(
                    422, f"unknown form field '{name[:100]}'; use {', '.join((self.file_field, *self.allowed))}"
                )
            )
        elif name in self.fields:
            self.fail(UploadRejected(422, f"form field '{name}' is sent twice; send each field once"))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        size = end - start
        self.data_bytes += size
        if self.data_bytes > self.max_bytes:
            self.fail(too_large(self.max_bytes))
        elif self.in_file:
            self.buffer.append(data[start:end])
            self.buffered += size
        elif len(self.field_value) + size > MAX_FIELD_BYTES:
            self.fail(
                UploadRejected(
                    413, f"form field '{self.part_name}' is longer than {MAX_FIELD_BYTES} bytes; send a shorter value"
                )
            )
        else:
            self.field_value += data[start:end]

    def on_part_end(self) -> None:
        if not self.in_file and self.part_name is not None and self.error is None:
            self.fields[self.part_name] = bytes(self.field_value).decode("utf-8", "replace")
        self.in_file = False

    def on_end(self) -> None:
        self.ended = True

    def parser(self, boundary: bytes) -> MultipartParser:
        names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
                 "on_header_end", "on_headers_finished", "on_end")  # fmt: skip
        callbacks = cast("MultipartCallbacks", {name: getattr(self, name) for name in names})
        return MultipartParser(boundary, callbacks)

    def take(self) -> bytes:
        """The buffered file bytes, emptying the buffer."""
        data = b"".join(self.buffer) if len(self.buffer) != 1 else self.buffer[0]
        self.buffer.clear()
        self.buffered = 0
        return data

    def _no_file(self) -> UploadRejected:
        return UploadRejected(
            422,
            f"no file in the form field '{self.file_field}'; send the TIFF as multipart/form-data in "
            f"'{self.file_field}'",
        )

    def check_complete(self) -> None:
        """Raise the first error, or :class:`UploadRejected` for a body without end or without the file."""
        if self.error is not None:
            raise self.error
        if not self.ended:
            raise UploadRejected(400, "the multipart body ended early (no closing boundary); resend the request")
        if not self.file_seen:
            raise self._no_file()


def _boundary(request: Request, max_bytes: int, file_field: str) -> bytes:
    """The multipart boundary of ``request``; :class:`UploadRejected` for another content type, no
    boundary or a declared length over ``max_bytes``."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UploadRejected(
            415, f"send the TIFF as multipart/form-data with the file in the form field '{file_field}'"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected(400, "the multipart/form-data Content-Type has no boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + MULTIPART_SLACK:
        raise too_large(max_bytes)
    return boundary


async def receive_upload(
    request: Request,
    storage: Storage,
    key: str,
    *,
    max_bytes: int,
    chunk_bytes: int,
    fields: Sequence[str],
    file_field: str = "file",
    max_voxels: int | None = None,
) -> ReceivedUpload:
    """Stream a multipart/form-data body: the part named ``file_field`` into ``storage`` at ``key``.

    Accepts, besides the file, only the text ``fields`` named, each once and at most
    :data:`MAX_FIELD_BYTES` long; any other part is refused at its headers, before its data is read.
    The data of every part counts toward ``max_bytes``, the whole body toward ``max_bytes`` plus
    :data:`MULTIPART_SLACK` (boundaries and headers). ``max_voxels`` is handed on with the result.
    Returns the pending (uncommitted) write and the text fields. Raises :class:`UploadRejected`
    (415 not multipart, 413 too large, 400 malformed, 422 missing or repeated file, unknown or
    repeated field).
    """
    boundary = _boundary(request, max_bytes, file_field)
    state = _Form(file_field, max_bytes, tuple(fields))
    pending = storage.begin_write(key)
    parser = state.parser(boundary)
    pipeline = _Pipeline(pending)
    body_bytes = 0
    try:
        async for chunk in request.stream():
            body_bytes += len(chunk)
            if body_bytes > max_bytes + MULTIPART_SLACK:
                raise too_large(max_bytes)
            if chunk:
                parser.write(chunk)
            if state.error is not None:
                raise state.error
            if state.buffered >= chunk_bytes:
                await pipeline.put(state.take())
        parser.finalize()
        state.check_complete()
        if state.buffered:
            await pipeline.put(state.take())
        await pipeline.finish()
        await run_in_threadpool(pending.close)
    except MultipartParseError as error:
        pipeline.stop()
        pending.abort()
        raise UploadRejected(400, f"malformed multipart body: {error}") from None
    except BaseException:
        pipeline.stop()
        pending.abort()
        raise
    return ReceivedUpload(pending=pending, filename=state.filename, fields=state.fields, max_voxels=max_voxels)
