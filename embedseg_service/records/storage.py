"""File storage for volumes, models and job outputs.

:class:`Storage` is the interface; :class:`LocalStorage` keeps files under a folder, and
:class:`~embedseg_service.records.object_storage.S3Storage` keeps them in an S3-compatible object store
(:func:`embedseg_service.records.stores.get_storage` picks the one the settings name). Writes go to
a temporary file that is renamed into place (or sent to the store) only when complete, so a reader
never sees a partial file and a failed write leaves nothing behind.
Keys are relative POSIX paths such as ``volumes/<id>.tif`` or ``jobs/<job id>/a<attempt>/labels-<id>.tif``.

A temporary file's name records the host and process writing it, so that files left by a process
that died (a killed upload, a killed worker) can be told from files still being written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from embedseg_service.core.data.ome_zarr import OME_ZARR_ZIP_SUFFIX

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_DIR = ".tmp"
STALE_TEMP_S = 3600.0
"""A temporary file of another host (whose writer cannot be checked) left unmodified this long is abandoned."""
PROCESS_STARTED = time.time()
"""When this process started (about: when this module was imported)."""


class StorageError(OSError):
    """A storage operation failed (bad key, missing file, unreachable store)."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key (segments of letters, digits, '.', '_', '-'); else raise."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(part) or part in {".", ".."} for part in parts):
        raise StorageError(f"invalid storage key {key!r}: use '/'-separated names of letters, digits, '.', '_', '-'")
    return key


def volume_key(volume_id: str) -> str:
    """Key of an uploaded volume's TIFF."""
    return check_key(f"volumes/{volume_id}.tif")


def volume_zarr_key(volume_id: str) -> str:
    """Key of an uploaded volume's zipped OME-Zarr store."""
    return check_key(f"volumes/{volume_id}{OME_ZARR_ZIP_SUFFIX}")


def model_key(model_id: str) -> str:
    """Key of an uploaded model checkpoint."""
    return check_key(f"models/{model_id}.pt")


def model_exports_prefix(model_id: str) -> str:
    """The folder of a model's exported networks (made on demand, removed with the model)."""
    return check_key(f"models/{model_id}")


def model_export_key(model_id: str, name: str) -> str:
    """Key of one exported network of a model, e.g. ``models/<id>/network.onnx``."""
    return check_key(f"{model_exports_prefix(model_id)}/{name}")


def job_prefix(job_id: str) -> str:
    """The folder of every file a job writes (its outputs and checkpoints, all attempts)."""
    return check_key(f"jobs/{job_id}")


def attempt_prefix(job_id: str, attempt: int) -> str:
    """The folder of the files one attempt (claim) of a job writes: ``jobs/<job id>/a<attempt>``."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    return check_key(f"jobs/{job_id}/a{attempt}")


def job_output_key(job_id: str, name: str, attempt: int | None = None) -> str:
    """Key of a job's output file: under the attempt's folder when ``attempt`` is given, so that a
    late or duplicate run writes beside the winner's files, never over them."""
    if attempt is None:
        return check_key(f"jobs/{job_id}/{name}")
    return check_key(f"{attempt_prefix(job_id, attempt)}/{name}")


def checkpoint_key(job_id: str, attempt: int) -> str:
    """Key of the resumable training state an attempt of a train job keeps (replaced every epoch)."""
    return job_output_key(job_id, "last.pt", attempt)


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_tag() -> str:
    """``<host>@<pid>``: who writes a temporary file (its name starts with it)."""
    return f"{socket.gethostname()}@{os.getpid()}"


def writer_gone(name: str, modified: float, older_than_s: float) -> bool:
    """Whether the temporary file or folder ``name`` (starting ``<host>@<pid>@``), last modified at
    ``modified`` (epoch seconds), was abandoned by its writer.

    Abandoned: anything when ``older_than_s`` is 0 or less; written on this host by a process that
    no longer runs, or by this process before it started (an earlier process with the same id, e.g.
    in a restarted container); of another host or without a tag: unmodified for ``older_than_s`` seconds.
    """
    if older_than_s <= 0:
        return True
    host, _, rest = name.partition("@")
    pid = rest.partition("@")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - modified >= older_than_s
    if int(pid) == os.getpid():
        return modified < PROCESS_STARTED
    return not process_alive(int(pid))


def remove_abandoned(folder: Path, older_than_s: float) -> int:
    """Remove the temporary files in ``folder`` whose writer is gone (:func:`writer_gone`); returns how many."""
    if not folder.is_dir():
        return 0
    count = 0
    for item in folder.iterdir():
        try:
            if item.is_file() and writer_gone(item.name, item.stat().st_mtime, older_than_s):
                item.unlink(missing_ok=True)
                count += 1
        except FileNotFoundError:  # committed or aborted meanwhile
            continue
    return count


class PendingWrite:
    """A file being written: ``write`` chunks, then ``commit`` (atomic rename) or ``abort`` (delete).

    ``sha256`` and ``size`` are computed while writing; ``temp_path`` can be inspected before commit.
    Another store subclasses it: it keeps the local temporary file (for inspection) and sends the bytes
    on from :meth:`_append`, and overrides :meth:`close`, :meth:`commit` and :meth:`abort`.
    """

    def __init__(self, final_path: Path, temp_path: Path, key: str) -> None:
        self.key = key
        self.final_path = final_path
        self.temp_path = temp_path
        self.size = 0
        self._hash: hashlib._Hash | None = hashlib.sha256()
        self._digest: str | None = None
        self._file: BinaryIO | None = open(temp_path, "wb")  # noqa: SIM115 - closed by commit/abort
        self.done = False

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written (or the digest given to :meth:`set_sha256`)."""
        if self._digest is not None:
            return self._digest
        if self._hash is None:
            raise StorageError(f"the SHA-256 of {self.key!r} is computed by the caller and was not given")
        return self._hash.hexdigest()

    def _append(self, data: bytes) -> None:
        if self._file is None:
            raise StorageError(f"write to {self.key!r} after it was closed")
        self._file.write(data)
        self.size += len(data)

    def write(self, data: bytes) -> int:
        """Append ``data`` and hash it."""
        if self._hash is None:
            raise StorageError(f"{self.key!r} is hashed by the caller; use write_unhashed")
        self._append(data)
        self._hash.update(data)
        return len(data)

    def write_unhashed(self, data: bytes) -> int:
        """Append ``data`` without hashing it: the caller hashes (in parallel) and calls :meth:`set_sha256`.

        Use one of :meth:`write` and :meth:`write_unhashed` for a whole file.
        """
        if self._hash is not None:
            if self.size:
                raise StorageError(f"{self.key!r} was hashed while writing; keep using write")
            self._hash = None
        self._append(data)
        return len(data)

    def set_sha256(self, digest: str) -> None:
        """Record the SHA-256 the caller computed over everything given to :meth:`write_unhashed`."""
        self._digest = digest

    def close(self) -> None:
        """Flush and close the temporary file (it stays until commit or abort)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def commit(self) -> None:
        """Move the finished file to its key (replacing an existing file atomically)."""
        if self.done:
            return
        self.close()
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, self.final_path)
        self.done = True

    def abort(self) -> None:
        """Drop the partial file."""
        if self.done:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temp_path.unlink(missing_ok=True)
        self.done = True


@runtime_checkable
class Storage(Protocol):
    """Where volumes, checkpoints and job outputs live."""

    def begin_write(self, key: str) -> PendingWrite:
        """Start writing ``key``; nothing is visible at ``key`` until the returned write is committed."""
        ...

    def open_write(self, key: str) -> AbstractContextManager[PendingWrite]:
        """Context manager around :meth:`begin_write`: commits on success, aborts on error."""
        ...

    def put(self, key: str, chunks: Iterable[bytes]) -> PendingWrite:
        """Store ``key`` from byte chunks (streamed); returns the committed write (size, sha256)."""
        ...

    def put_file(self, key: str, source: Path) -> int:
        """Store a copy of a local file at ``key``; returns its size."""
        ...

    def open_read(self, key: str) -> BinaryIO:
        """Open ``key`` for reading (binary); raises :class:`StorageError` if absent."""
        ...

    def path_for(self, key: str) -> Path:
        """A local path holding the content of ``key`` (for readers that need a file name): the file
        itself, or a checksum-verified copy in a local cache; raises :class:`StorageError` if absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; False when it did not exist."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under the folder ``prefix``; returns how many files went."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of the files under the folder ``prefix`` (sorted; empty when there is none)."""
        ...

    def list_folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under ``prefix`` (sorted; e.g. the job ids under ``jobs``)."""
        ...

    def reachable(self) -> str | None:
        """None when the store can be written and read, else a sentence saying what is wrong."""
        ...

    def clean_temp(self, older_than_s: float = 0.0) -> int:
        """Remove temporary files their writers abandoned; returns how many went."""
        ...


class WriteHelpers:
    """:meth:`open_write`, :meth:`put` and :meth:`put_file` of a :class:`Storage`, on its ``begin_write``."""

    def begin_write(self, key: str) -> PendingWrite:
        raise NotImplementedError

    @contextmanager
    def open_write(self, key: str) -> Iterator[PendingWrite]:
        """Context manager around :meth:`begin_write`: commits on success, aborts on error."""
        pending = self.begin_write(key)
        try:
            yield pending
        except BaseException:
            pending.abort()
            raise
        pending.commit()

    def put(self, key: str, chunks: Iterable[bytes]) -> PendingWrite:
        """Store ``key`` from byte chunks (streamed); returns the committed write (size, sha256)."""
        with self.open_write(key) as pending:
            for chunk in chunks:
                pending.write(chunk)
        return pending

    def put_file(self, key: str, source: Path) -> int:
        """Store a copy of a local file at ``key``; returns its size."""
        with self.open_write(key) as pending, open(source, "rb") as handle:
            while chunk := handle.read(1024 * 1024):
                pending.write(chunk)
        return pending.size


class LocalStorage(WriteHelpers):
    """:class:`Storage` on a local folder (temp files under ``<root>/.tmp`` on the same file system)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _temp_dir(self) -> Path:
        temp = self.root / TEMP_DIR
        temp.mkdir(parents=True, exist_ok=True)
        return temp

    def begin_write(self, key: str) -> PendingWrite:
        final = self._path(key)
        temp = self._temp_dir() / f"{writer_tag()}@{uuid.uuid4().hex}.part"
        return PendingWrite(final, temp, key)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise StorageError(f"no stored file under key {key!r}") from None

    def path_for(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no stored file under key {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no stored file under key {key!r}") from None

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix)
        if not folder.is_dir():
            return 0
        count = sum(1 for item in folder.rglob("*") if item.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(item.relative_to(self.root).as_posix() for item in folder.rglob("*") if item.is_file())

    def list_folders(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(item.name for item in folder.iterdir() if item.is_dir())

    def reachable(self) -> str | None:
        try:
            probe = self._temp_dir() / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            ok = probe.read_bytes() == b"ok"
            probe.unlink()
        except OSError as error:
            return f"storage folder {self.root} is not writable: {error.strerror or error}"
        return None if ok else f"storage folder {self.root} returned different bytes than written"

    def clean_temp(self, older_than_s: float = 0.0) -> int:
        """Remove temporary files abandoned by their writer (see :func:`writer_gone`); returns how many went.

        The default, 0, removes every temporary file: only when nothing writes to the store. Processes
        that start beside others sharing the store (API, workers) pass :data:`STALE_TEMP_S`.
        """
        return remove_abandoned(self.root / TEMP_DIR, older_than_s)
