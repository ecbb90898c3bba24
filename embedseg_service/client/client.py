"""The Python client of the EmbedSeg Service REST API (``/api/v1``), on httpx.

Every call is retried as :mod:`embedseg_service.client.retries` says; every creating POST sends
an ``Idempotency-Key`` (a new UUID per call unless given) that its resends repeat. Error answers
raise :class:`~embedseg_service.client.errors.ApiError` with the server's ``detail``.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import httpx
import numpy as np
from pydantic import BaseModel

from embedseg_service import __version__
from embedseg_service.client.errors import error_for
from embedseg_service.client.progress import wait_for
from embedseg_service.client.retries import RetryPolicy, send_with_retries
from embedseg_service.client.sources import PathSource, array_as_tiff, tiff_files, voxel_size_field
from embedseg_service.core.data.io import read_tiff
from embedseg_service.records.schemas import JobOut, ModelOut, Page, VolumeOut, parse_voxel_size

API_KEY_ENV = "EMBEDSEG_API_KEY"
"""Environment variable holding the API key when none is given."""
API_PREFIX = "/api/v1"
PAGE_SIZE = 100
IDEMPOTENCY_HEADER = "Idempotency-Key"

Row = TypeVar("Row", bound=BaseModel)


class HasId(Protocol):
    @property
    def id(self) -> str: ...


Ref = str | HasId
"""An id, or a row (VolumeOut, JobOut, ModelOut) whose ``id`` is used."""


def _id(ref: Ref) -> str:
    return ref if isinstance(ref, str) else ref.id


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text.strip()


def _filename(response: httpx.Response, fallback: str) -> str:
    """The file name of the answer's ``Content-Disposition`` (folders dropped), else ``fallback``."""
    header = response.headers.get("Content-Disposition")
    if header:
        message = Message()
        message["Content-Disposition"] = header
        name = message.get_filename()
        if name and Path(name).name not in ("", ".", ".."):
            return Path(name).name
    return fallback


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Client:
    """A session with the service at ``base_url`` (e.g. ``http://127.0.0.1:8000``).

    ``api_key`` defaults to the environment variable ``EMBEDSEG_API_KEY`` (no key when unset);
    ``timeout`` is per request, in seconds; a failed request is sent again up to ``retries``
    times (``None``: no count, then ``retry_deadline`` alone bounds it) and, when
    ``retry_deadline`` is set, for at most that many seconds after its first try, waiting
    ``backoff * 2**attempt`` seconds or the server's ``Retry-After``, either at most 30 (see
    :mod:`embedseg_service.client.retries`). ``http`` replaces the httpx client this object would
    make (``timeout`` then does not apply: that client's own does; its base URL is not used;
    :meth:`close` leaves it open). ``sleep`` is how it waits between resends and polls, ``clock``
    (seconds, monotonic) how it measures deadlines. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int | None = 5,
        backoff: float = 0.5,
        retry_deadline: float | None = None,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root.removesuffix(API_PREFIX).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.policy = RetryPolicy(retries=retries, backoff=backoff, deadline=retry_deadline)
        self.sleep = sleep
        self.clock = clock
        self._owns_http = http is None
        self.http = http if http is not None else httpx.Client(timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (of an httpx client this object made)."""
        if self._owns_http:
            self.http.close()

    # ------------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API_PREFIX}{path}"

    def _headers(self, idempotency_key: str | None = None) -> dict[str, str]:
        headers = {"User-Agent": f"embedseg-service-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        return headers

    def _send(
        self, method: str, path: str, attempt: Callable[[], httpx.Response], policy: RetryPolicy | None = None
    ) -> httpx.Response:
        """Send with retries (``policy``, default the client's); raise the ApiError of a final error answer."""
        what = f"{method} {self._url(path)}"
        response = send_with_retries(attempt, policy or self.policy, self.sleep, what, self.clock)
        if response.is_success:
            return response
        raise error_for(response.status_code, _body(response), method=method, url=self._url(path))

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotency_key: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> httpx.Response:
        headers = self._headers(idempotency_key)
        query = {k: v for k, v in (params or {}).items() if v is not None}

        def attempt() -> httpx.Response:
            return self.http.request(method, self._url(path), params=query, json=json, headers=headers)

        return self._send(method, path, attempt, policy)

    def _pages(self, path: str, row: type[Row], params: Mapping[str, Any]) -> Iterator[Row]:
        """Every row of a list route, page by page (newest first)."""
        offset = 0
        while True:
            body = self._call("GET", path, params={**params, "limit": PAGE_SIZE, "offset": offset}).json()
            page = Page[row].model_validate(body)  # type: ignore[valid-type]
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def _stream_to(self, path: str, destination: PathSource, fallback_name: str) -> Path:
        """GET ``path`` into ``destination``: a file, or a folder (one that exists, or a path ending in
        ``/``, then made) that gets the server's file name inside it."""
        text = os.fspath(destination)
        target = Path(text)
        if text.endswith(("/", os.sep)):
            target.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        headers = self._headers()

        def attempt() -> httpx.Response:
            with self.http.stream("GET", self._url(path), headers=headers) as response:
                if not response.is_success:
                    response.read()
                    return response
                file = target / _filename(response, fallback_name) if target.is_dir() else target
                _write_atomic(file, response.iter_bytes())
                written[:] = [file]
                return response

        self._send("GET", path, attempt)
        return written[0]

    # ------------------------------------------------------------------ volumes

    def _post_file(
        self, path: Path, filename: str, fields: Mapping[str, str | None], idempotency_key: str | None
    ) -> VolumeOut:
        headers = self._headers(idempotency_key or str(uuid.uuid4()))
        data = {k: v for k, v in fields.items() if v is not None}

        def attempt() -> httpx.Response:
            with path.open("rb") as handle:
                files = {"file": (filename, handle, "image/tiff")}
                return self.http.post(self._url("/volumes"), files=files, data=data, headers=headers)

        return VolumeOut.model_validate(self._send("POST", "/volumes", attempt).json())

    def upload(
        self,
        source: PathSource | np.ndarray,
        *,
        kind: str = "image",
        name: str | None = None,
        axes: str | None = None,
        voxel_size: Sequence[float] | str | None = None,
        image_id: Ref | None = None,
        idempotency_key: str | None = None,
    ) -> VolumeOut:
        """Upload one TIFF file or numpy array as a volume of ``kind`` (``image`` or ``labels``).

        ``name`` defaults to the file's name without suffix (``array`` for an array); ``axes``
        names the axes of the file (overriding its metadata) or of the array (default ``YX``,
        ``ZYX``, ``CZYX`` by its dimensions); ``voxel_size`` is in array order (``"z,y,x"`` or a
        sequence); ``image_id`` ties labels to their image. A label array must be integers >= 0.
        Folders and patterns go to :meth:`upload_many`.
        """
        fields = {"kind": str(kind), "name": name, "voxel_size": voxel_size_field(voxel_size)}
        fields["image_id"] = None if image_id is None else _id(image_id)
        if isinstance(source, np.ndarray):
            voxel = parse_voxel_size(voxel_size) if isinstance(voxel_size, str) else voxel_size
            with array_as_tiff(source, labels=str(kind) == "labels", axes=axes, voxel_size=voxel) as path:
                return self._post_file(path, f"{name or 'array'}.tif", fields, idempotency_key)
        path = Path(source)
        if not path.is_file():
            hint = "; use upload_many for a folder or a pattern" if path.is_dir() or "*" in str(source) else ""
            raise FileNotFoundError(f"{source} is not a file{hint}")
        return self._post_file(path, path.name, {**fields, "axes": axes}, idempotency_key)

    def upload_many(
        self,
        source: PathSource | Sequence[PathSource],
        *,
        kind: str = "image",
        axes: str | None = None,
        voxel_size: Sequence[float] | str | None = None,
        image_ids: Sequence[Ref] | None = None,
    ) -> list[VolumeOut]:
        """Upload every TIFF of a folder, a glob pattern or a list of paths (sorted by name; see
        :func:`~embedseg_service.client.sources.tiff_files`), one volume each, in that order.

        ``image_ids`` pairs label files with their images by position.
        """
        paths = tiff_files(source)
        if image_ids is not None and len(image_ids) != len(paths):
            raise ValueError(f"{len(paths)} files but {len(image_ids)} image_ids; give one image id per file")
        images: list[Ref | None] = list(image_ids) if image_ids is not None else [None] * len(paths)
        return [
            self.upload(path, kind=kind, axes=axes, voxel_size=voxel_size, image_id=image)
            for path, image in zip(paths, images)
        ]

    def volume(self, volume: Ref) -> VolumeOut:
        """One volume."""
        return VolumeOut.model_validate(self._call("GET", f"/volumes/{_id(volume)}").json())

    def volumes(self, kind: str | None = None) -> Iterator[VolumeOut]:
        """Every volume this key sees (of ``kind`` ``image`` or ``labels`` when given), newest first."""
        return self._pages("/volumes", VolumeOut, {"kind": kind})

    def download(self, volume: Ref, path: PathSource) -> Path:
        """Write the volume's TIFF to ``path``; into it, under the volume's name, when it is a folder
        (one that exists, or a path ending in ``/``); returns the file written."""
        volume_id = _id(volume)
        return self._stream_to(f"/volumes/{volume_id}/download", path, f"{volume_id}.tif")

    def download_labels(self, volume: Ref, path: PathSource | None = None) -> np.ndarray:
        """The volume's pixels as an array (``(Y, X)`` or ``(Z, Y, X)`` for labels); also written to
        ``path`` as the stored TIFF when given."""
        volume_id = _id(volume)
        content = self._call("GET", f"/volumes/{volume_id}/download").content
        if path is not None:
            _write_atomic(Path(path), [content])
        return read_tiff(io.BytesIO(content)).data

    # ------------------------------------------------------------------ jobs

    def _submit(self, kind: str, spec: Mapping[str, Any], idempotency_key: str | None) -> JobOut:
        body = {k: v for k, v in spec.items() if v is not None}
        response = self._call("POST", f"/jobs/{kind}", json=body, idempotency_key=idempotency_key or str(uuid.uuid4()))
        return JobOut.model_validate(response.json())

    def train(
        self,
        image_ids: Sequence[Ref],
        mask_ids: Sequence[Ref],
        *,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> JobOut:
        """Submit a training job on images and their masks (paired by position); ``options`` are the
        other fields of ``POST /jobs/train`` (``dims``, ``epochs``, ``max_time_minutes``, ``name``, ...).
        ``callback_url`` gets the finished job's JSON, signed (a webhook; see the API docs)."""
        for field in ("val_image_ids", "val_mask_ids"):
            if options.get(field) is not None:
                options[field] = [_id(ref) for ref in options[field]]
        spec = {"image_ids": [_id(r) for r in image_ids], "mask_ids": [_id(r) for r in mask_ids], **options}
        spec["callback_url"] = callback_url
        return self._submit("train", spec, idempotency_key)

    def predict(
        self,
        model: Ref,
        volume_ids: Sequence[Ref],
        *,
        gt_ids: Sequence[Ref] | None = None,
        tta: bool | None = None,
        tile: str | Sequence[int] | None = None,
        min_size: int | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobOut:
        """Submit one prediction job for many volumes; options left ``None`` take the server's defaults;
        ``callback_url`` gets the finished job's JSON, signed (a webhook)."""
        spec = {
            "model_id": _id(model),
            "volume_ids": [_id(r) for r in volume_ids],
            "gt_ids": None if gt_ids is None else [_id(r) for r in gt_ids],
            "tta": tta,
            "tile": tile if tile is None or isinstance(tile, str) else list(tile),
            "min_size": min_size,
            "callback_url": callback_url,
        }
        return self._submit("predict", spec, idempotency_key)

    def evaluate(
        self,
        pairs: Sequence[tuple[Ref, Ref] | Mapping[str, str]],
        *,
        thresholds: Sequence[float] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobOut:
        """Submit an evaluation of ``(gt, pred)`` pairs (tuples or ``{"gt_id", "pred_id"}`` mappings);
        ``callback_url`` gets the finished job's JSON, signed (a webhook)."""
        body = [
            dict(pair) if isinstance(pair, Mapping) else {"gt_id": _id(pair[0]), "pred_id": _id(pair[1])}
            for pair in pairs
        ]
        spec = {
            "pairs": body,
            "thresholds": None if thresholds is None else list(thresholds),
            "callback_url": callback_url,
        }
        return self._submit("evaluate", spec, idempotency_key)

    def job(self, job: Ref) -> JobOut:
        """A job's current state."""
        return JobOut.model_validate(self._call("GET", f"/jobs/{_id(job)}").json())

    def jobs(self, status: str | None = None, kind: str | None = None) -> Iterator[JobOut]:
        """Every job this key sees (filtered by ``status`` and ``kind`` when given), newest first."""
        return self._pages("/jobs", JobOut, {"status": status, "kind": kind})

    def wait(
        self, job: Ref, *, timeout: float | None = None, poll_s: float = 2.0, progress: bool | None = None
    ) -> JobOut:
        """Poll the job until it is final and return it when it succeeded: every ``poll_s`` seconds, after
        quicker first polls (0.05 s, then 1.5 times the last wait), so that a short job is seen finished
        soon after it ends.

        A poll that fails is retried as every request is (no longer than ``timeout`` allows).
        Raises :class:`~embedseg_service.client.errors.JobFailed` (with the job) when it ended
        ``failed`` or ``cancelled``, :class:`~embedseg_service.client.errors.WaitTimeout` after
        ``timeout`` seconds, :class:`~embedseg_service.client.errors.WaitInterrupted` (a
        ``ConnectionFailed``, with the last state seen) when the server stayed unreachable past the
        retries. A finished job answers at once, so waiting again resumes. ``progress`` draws a tqdm
        bar (default: when standard error is a terminal).
        """
        path = f"/jobs/{_id(job)}"

        def poll(left: float | None) -> JobOut:
            return JobOut.model_validate(self._call("GET", path, policy=self.policy.within(left)).json())

        return wait_for(poll, timeout=timeout, poll_s=poll_s, progress=progress, sleep=self.sleep, clock=self.clock)

    # ------------------------------------------------------------------ models

    def model(self, model: Ref) -> ModelOut:
        """One trained model: configuration, data-derived parameters, metrics."""
        return ModelOut.model_validate(self._call("GET", f"/models/{_id(model)}").json())

    def models(self) -> Iterator[ModelOut]:
        """Every model this key sees, newest first."""
        return self._pages("/models", ModelOut, {})

    def download_model(self, model: Ref, path: PathSource) -> Path:
        """Write the model file to ``path`` (into it, as for :meth:`download`, when it is a folder);
        returns the file written. Load it with :func:`embedseg_service.core.load_model`."""
        model_id = _id(model)
        return self._stream_to(f"/models/{model_id}/download", path, f"{model_id}.pt")

    def export_model(self, model: Ref, path: PathSource, format: str = "torchscript") -> Path:
        """Write the model's network as ``format`` (``torchscript``: a ``.pt`` file for ``torch.jit.load``;
        ``onnx``: a ``.onnx`` file) to ``path`` (into it, under the model's name, when it is a folder);
        returns the file written. The input it expects: ``GET /models/{id}/export`` in the API docs."""
        model_id = _id(model)
        suffix = ".onnx" if format == "onnx" else ".pt"
        query = urlencode({"format": format})
        return self._stream_to(f"/models/{model_id}/export?{query}", path, f"{model_id}{suffix}")
