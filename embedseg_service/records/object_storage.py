"""Storage on an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...).

The store holds key ``K`` as the object ``<prefix>/K`` of one bucket (``EMBEDSEG_STORAGE_URL =
s3://bucket/prefix``); nothing is shared between the API and the workers but the store, so each
process may run on its own machine. Credentials come from boto3's standard chain (the variables
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, a profile, a role).

Writes: a :class:`S3PendingWrite` keeps the local temporary file a :class:`PendingWrite` keeps (so
that uploads can be inspected before commit) and sends the bytes on in parts of
``EMBEDSEG_S3_PART_BYTES`` while they arrive (a multipart upload, started with the first full
part); commit sends the rest and completes the upload (a file smaller than one part goes in one
request), abort aborts it. Memory holds one part at most. The committed temporary file becomes the
local cached copy of the key.

Reads: :meth:`S3Storage.open_read` streams the object; :meth:`S3Storage.path_for` answers from a
bounded, checksum-verified local cache (:class:`~embedseg_service.records.file_cache.FileCache`)
after checking the object's current ETag and size.

Why boto3: its ``s3`` client has each call this needs as such, with its retries: multipart uploads
whose completion and abort the caller controls, ListMultipartUploads and ListParts to find the
uploads of dead processes, streamed GetObject, batch DeleteObjects. It is pure Python (botocore,
s3transfer, jmespath, python-dateutil, urllib3; about 35 MB installed, no compiled code). obstore
hides multipart uploads inside its writer and cannot list or abort the uploads a dead process left;
s3fs (fsspec) brings aiobotocore and aiohttp for the same calls.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from embedseg_service.records.file_cache import FileCache, Version, Writer
from embedseg_service.records.storage import PendingWrite, StorageError, WriteHelpers, check_key

if TYPE_CHECKING:
    from embedseg_service.records.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
DELETE_BATCH = 1000
"""Most keys of one DeleteObjects request (the S3 limit)."""
NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
FULL = frozenset({"XMinioStorageFull", "QuotaExceeded", "InsufficientStorage", "EntityTooLarge"})
"""Error codes meaning the store cannot hold what is written (answered 507 like a full disk)."""
DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})

T = TypeVar("T")


def make_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client: path-style addressing on a custom endpoint, standard retries, checksums only
    where S3 requires them (other S3 servers reject some of the newer ones)."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def error_code(error: BaseException) -> str:
    """The S3 error code of a botocore error (``''`` for errors without one)."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def _reason(error: BaseException, where: str) -> tuple[str, bool]:
    """What went wrong on the store ``where``, and whether it is full."""
    if isinstance(error, ClientError):
        code = error_code(error)
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.response.get("Error", {}).get("Message") or code
        if code in FULL or status == 507:
            return f"the object store {where} is full ({code or status}: {message})", True
        if code == "NoSuchBucket":
            return f"the bucket of {where} does not exist; create it or fix EMBEDSEG_STORAGE_URL", False
        if code in DENIED:
            return (
                f"the object store {where} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY",
                False,
            )
        return f"the object store {where} answered {code or status}: {message}", False
    if isinstance(error, NoCredentialsError):
        return f"no credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", False
    return f"the object store {where} is unreachable: {error}", False


def storage_error(error: BaseException, what: str, where: str) -> StorageError:
    """The :class:`StorageError` saying why ``what`` (e.g. ``reading 'volumes/v.tif'``; empty: nothing named)
    failed on the store ``where``; a full store's carries ``errno.ENOSPC``, so that the API answers 507."""
    reason, full = _reason(error, where)
    text = f"{what}: {reason}" if what else reason
    return StorageError(errno.ENOSPC, text) if full else StorageError(text)


class ObjectChanged(StorageError):
    """The object was replaced while it was being read (its ETag no longer matches)."""


class _Body(io.RawIOBase):
    """A GetObject body as a raw stream whose errors are :class:`StorageError`."""

    def __init__(self, body: Any, key: str, where: str) -> None:
        self._body = body
        self._key = key
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except (BotoCoreError, ClientError, OSError) as error:
            raise storage_error(error, f"reading {self._key!r}", self._where) from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3PendingWrite(PendingWrite):
    """A write to the object store: a local temporary file, sent on in parts (see the module docstring)."""

    def __init__(self, store: S3Storage, key: str) -> None:
        super().__init__(store.cache.data_path(key), store.cache.temp_file(), key)
        self.store = store
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.sent = 0
        self.etag: str | None = None

    def _append(self, data: bytes) -> None:
        super()._append(data)
        if self.size - self.sent >= self.store.part_bytes:
            self._send_parts(final=False)

    def _send_parts(self, *, final: bool) -> None:
        """Send each full part not yet sent (and with ``final``, the rest), read back from the temporary file."""
        if self._file is not None:
            self._file.flush()
        part_bytes = self.store.part_bytes
        with open(self.temp_path, "rb") as source:
            source.seek(self.sent)
            while (left := self.size - self.sent) >= part_bytes or (final and left > 0):
                body = source.read(min(left, part_bytes))
                if self.upload_id is None:
                    self.upload_id = self.store.create_upload(self.key)
                etag = self.store.upload_part(self.key, self.upload_id, len(self.parts) + 1, body)
                self.parts.append({"PartNumber": len(self.parts) + 1, "ETag": etag})
                self.sent += len(body)

    def close(self) -> None:
        """Flush and close the temporary file (no fsync: the store, not this file, keeps the bytes)."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def _known_sha256(self) -> str | None:
        if self._digest is not None:
            return self._digest
        return None if self._hash is None else self._hash.hexdigest()

    def commit(self) -> None:
        """Send what is left and complete the upload; the temporary file becomes the cached copy."""
        if self.done:
            return
        self.close()
        try:
            if self.upload_id is None:
                with open(self.temp_path, "rb") as body:
                    self.etag = self.store.put_object(self.key, body.read())
            else:
                self._send_parts(final=True)
                self.etag = self.store.complete_upload(self.key, self.upload_id, self.parts)
        except BaseException:
            self.abort()
            raise
        self.done = True
        sha256 = self._known_sha256()
        if sha256 is None:
            self.temp_path.unlink(missing_ok=True)
        else:
            self.store.cache.adopt(self.key, self.temp_path, Version(self.etag, self.size), sha256)

    def abort(self) -> None:
        """Drop the temporary file and abort the upload (an abort the store misses is left to ``clean_temp``)."""
        if self.done:
            return
        super().abort()
        if self.upload_id is not None:
            try:
                self.store.abort_upload(self.key, self.upload_id)
            except StorageError as error:
                log.warning("could not abort the upload of %r (clean_temp will): %s", self.key, error)


class S3Storage(WriteHelpers):
    """:class:`~embedseg_service.records.storage.Storage` on the objects ``<prefix>/<key>`` of one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        cache: FileCache,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_bytes: int = 8 * 1024**2,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.cache = cache
        self.endpoint_url = endpoint_url
        self.part_bytes = part_bytes
        self.client = client if client is not None else make_client(endpoint_url, region)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        """The store of ``settings.storage_url`` with the cache of ``settings.cache_path``."""
        if settings.storage_url is None:
            raise ValueError("storage_url is not set")
        bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
        return cls(
            bucket,
            prefix,
            cache=FileCache(settings.cache_path, settings.cache_max_bytes),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            part_bytes=settings.s3_part_bytes,
        )

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` (and the endpoint, when not AWS)."""
        base = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{base} at {self.endpoint_url}" if self.endpoint_url else base

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    def object_name(self, key: str) -> str:
        """The object name of ``key`` in the bucket."""
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, call: Callable[..., T], **kwargs: Any) -> T:
        try:
            return call(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as error:
            raise storage_error(error, what, self.url) from None

    # ------------------------------------------------------------------ multipart upload steps

    def create_upload(self, key: str) -> str:
        """Start a multipart upload of ``key``; returns its id."""
        answer = self._call(
            f"starting the upload of {key!r}", self.client.create_multipart_upload, Key=self.object_name(key)
        )
        return str(answer["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        """Send part ``number`` (from 1) of an upload; returns its ETag."""
        answer = self._call(
            f"sending part {number} of {key!r}",
            self.client.upload_part,
            Key=self.object_name(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return str(answer["ETag"])

    def complete_upload(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> str:
        """Complete an upload from its parts; returns the object's ETag (quotes stripped)."""
        answer = self._call(
            f"completing the upload of {key!r}",
            self.client.complete_multipart_upload,
            Key=self.object_name(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        return str(answer["ETag"]).strip('"')

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an upload (its parts are dropped by the store)."""
        self._call(
            f"aborting the upload of {key!r}",
            self.client.abort_multipart_upload,
            Key=self.object_name(key),
            UploadId=upload_id,
        )

    def put_object(self, key: str, body: bytes) -> str:
        """Store a small object in one request; returns its ETag (quotes stripped)."""
        answer = self._call(f"storing {key!r}", self.client.put_object, Key=self.object_name(key), Body=body)
        return str(answer["ETag"]).strip('"')

    # ------------------------------------------------------------------ Storage

    def begin_write(self, key: str) -> S3PendingWrite:
        """Start writing ``key``; nothing is visible at ``key`` until the returned write is committed."""
        check_key(key)
        return S3PendingWrite(self, key)

    def open_read(self, key: str) -> BinaryIO:
        """Stream the object of ``key`` (buffered); raises :class:`StorageError` if absent."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))
        except (BotoCoreError, ClientError) as error:
            if error_code(error) in NOT_FOUND:
                raise StorageError(f"no stored file under key {key!r}") from None
            raise storage_error(error, f"reading {key!r}", self.url) from None
        return cast(BinaryIO, io.BufferedReader(_Body(answer["Body"], key, self.url), buffer_size=CHUNK))

    def _version(self, key: str) -> Version | None:
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except (BotoCoreError, ClientError) as error:
            if error_code(error) in NOT_FOUND:
                return None
            raise storage_error(error, f"looking up {key!r}", self.url) from None
        return Version(str(answer["ETag"]).strip('"'), int(answer["ContentLength"]))

    def _existing(self, key: str) -> Version:
        version = self._version(key)
        if version is None:
            raise StorageError(f"no stored file under key {key!r}")
        return version

    def _download(self, key: str, version: Version, write: Writer) -> None:
        """Send the bytes of ``version`` of ``key`` to ``write`` (StorageError if the object changed)."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key), IfMatch=f'"{version.tag}"')
        except (BotoCoreError, ClientError) as error:
            if error_code(error) in ("PreconditionFailed", "412"):
                raise ObjectChanged(f"{key!r} was replaced while it was being read") from None
            raise storage_error(error, f"reading {key!r}", self.url) from None
        with io.BufferedReader(_Body(answer["Body"], key, self.url), buffer_size=CHUNK) as body:
            while chunk := body.read(CHUNK):
                write(chunk)

    def path_for(self, key: str) -> Path:
        """A verified local copy of the object's current version (fetched into the cache when needed)."""
        for _ in range(3):  # the object may be replaced while it is fetched
            version = self._existing(key)
            try:
                return self.cache.get(key, version, functools.partial(self._download, key, version))
            except ObjectChanged:
                continue
        raise StorageError(f"{key!r} kept changing while it was fetched from {self.url}")

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return self._version(key) is not None

    def size(self, key: str) -> int:
        """Bytes of ``key``; raises :class:`StorageError` if absent."""
        return self._existing(key).size

    def delete(self, key: str) -> bool:
        """Remove ``key`` (and its cached copy); False when it did not exist."""
        existed = self.exists(key)
        if existed:
            self._call(f"deleting {key!r}", self.client.delete_object, Key=self.object_name(key))
        self.cache.discard(key)
        return existed

    def _objects(self, prefix: str) -> Iterator[str]:
        """The keys of the objects under the folder ``prefix``."""
        start = self.object_name(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    yield str(item["Key"])[skip:]
        except (BotoCoreError, ClientError) as error:
            raise storage_error(error, f"listing {prefix!r}", self.url) from None

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under the folder ``prefix`` (and the cached copies); returns how many went."""
        keys = list(self._objects(prefix))
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self.object_name(key)} for key in keys[start : start + DELETE_BATCH]]
            answer = self._call(
                f"deleting under {prefix!r}", self.client.delete_objects, Delete={"Objects": batch, "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageError(f"deleting {first.get('Key')!r} from {self.url} failed: {first.get('Message')}")
        self.cache.discard_prefix(prefix)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of the objects under the folder ``prefix`` (sorted)."""
        return sorted(self._objects(prefix))

    def list_folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under ``prefix`` that hold objects (sorted)."""
        start = check_key(prefix) + "/"
        return sorted({key[len(start) :].split("/")[0] for key in self._objects(prefix) if "/" in key[len(start) :]})

    def reachable(self) -> str | None:
        """None when the store and the cache folder can be written and read, else a sentence saying what is wrong."""
        problem = self.cache.writable()
        if problem:
            return problem
        probe = f"{self.prefix}/.probe/{uuid.uuid4().hex}".lstrip("/")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            ok = self.client.get_object(Bucket=self.bucket, Key=probe)["Body"].read() == b"ok"
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as error:
            return str(storage_error(error, "", self.url))
        return None if ok else f"the object store {self.url} returned different bytes than written"

    def clean_temp(self, older_than_s: float = 0.0) -> int:
        """Remove the cache's abandoned temporary files and abort the multipart uploads under the prefix
        with no new part for ``older_than_s`` seconds (0: every upload: only when nothing writes to the
        store); returns how many went."""
        count = self.cache.clean_temp(older_than_s)
        for key, upload_id in self._stale_uploads(older_than_s):
            self._call("aborting an abandoned upload", self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
            count += 1
        return count

    def _stale_uploads(self, older_than_s: float) -> list[tuple[str, str]]:
        now = datetime.now(timezone.utc).timestamp()
        stale = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    key, upload_id = str(upload["Key"]), str(upload["UploadId"])
                    if older_than_s <= 0 or (
                        now - upload["Initiated"].timestamp() >= older_than_s
                        and now - self._last_part_time(key, upload_id, upload["Initiated"]) >= older_than_s
                    ):
                        stale.append((key, upload_id))
        except (BotoCoreError, ClientError) as error:
            raise storage_error(error, "listing unfinished uploads", self.url) from None
        return stale

    def _last_part_time(self, key: str, upload_id: str, initiated: datetime) -> float:
        answer = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
        times = [part["LastModified"].timestamp() for part in answer.get("Parts", [])]
        return max([initiated.timestamp(), *times])
