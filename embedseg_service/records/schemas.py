"""Request and response bodies (pydantic; no web framework here).

Job specs check every option early and say how to fix a bad one; the worker receives the
validated spec as stored on the job row (``spec.model_dump(mode="json")``). Training options take their
defaults and choices from :class:`embedseg_service.core.training.config.TrainConfig`, prediction's TTA
default from :mod:`embedseg_service.core.inference.defaults` (both dependency-free modules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.inference.defaults import DEFAULT_TTA
from embedseg_service.core.training.config import option_default
from embedseg_service.records.callbacks import MAX_URL_LENGTH, check_url
from embedseg_service.records.orm import JobKind, JobStatus, VolumeFormat, VolumeKind
from embedseg_service.records.settings import QUEUE_PATTERN

T = TypeVar("T")

MAX_IDS = 1000
MAX_CROP_SIZE = 16384
"""Largest side of an explicit training crop, whatever the data."""


class Orm(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items``, the ``total`` number of rows, and the ``limit``/``offset`` asked."""

    items: list[T]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- volumes


class VolumeOut(Orm):
    id: str
    name: str
    kind: VolumeKind
    shape: list[int]
    dtype: str
    axes: str
    sha256: str
    voxel_size: list[float] | None = None
    size_bytes: int
    created_at: datetime
    owner: str | None = None
    source_job_id: str | None = None
    image_volume_id: str | None = None
    format: VolumeFormat = Field(
        default=VolumeFormat.tiff, description="tiff, or ome-zarr: a zipped OME-Zarr store, read by chunks"
    )


def parse_voxel_size(text: str | None, ndim: int | None = None) -> list[float] | None:
    """Parse ``"z,y,x"`` (or ``"y,x"``) into positive floats in array order; empty -> None.

    Raises ValueError saying how to write it.
    """
    if text is None or not text.strip():
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"voxel_size {text!r} must be comma-separated numbers in array order, e.g. '2.0,0.5,0.5'"
        ) from None
    if len(values) not in (2, 3):
        raise ValueError(f"voxel_size {text!r} must have 2 (y,x) or 3 (z,y,x) values, got {len(values)}")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"voxel_size {text!r} must be positive numbers")
    if ndim is not None and len(values) != ndim:
        raise ValueError(f"voxel_size has {len(values)} values but the volume has {ndim} spatial axes")
    return values


def parse_axes(text: str | None) -> str | None:
    """Check an axes string such as ``"ZYX"``, ``"YX"``, ``"CZYX"``, ``"CYX"`` (upper-cased); empty -> None."""
    if text is None or not text.strip():
        return None
    axes = text.strip().upper()
    if axes not in {"YX", "ZYX", "CYX", "CZYX"}:
        raise ValueError(f"axes {text!r} is not supported; use one of YX, ZYX, CYX, CZYX")
    return axes


# --------------------------------------------------------------------------- jobs

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""What a row id may look like (ids are UUIDs; this also keeps control characters out of queries)."""

VolumeId = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]


def _callback_url(url: str | None) -> str | None:
    return None if url is None else check_url(url)


JobQueue = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=64,
        pattern=QUEUE_PATTERN,
        description="broker queue of the job, one the server lists (EMBEDSEG_QUEUES), e.g. a queue of large GPUs; "
        "default: EMBEDSEG_GPU_QUEUE",
    ),
]


CallbackUrl = Annotated[
    str | None,
    AfterValidator(_callback_url),
    Field(
        description="http(s) URL that gets the job's JSON, signed, when the job succeeds, fails or is cancelled "
        f"(at most {MAX_URL_LENGTH} characters, no credentials, a public address; needs EMBEDSEG_WEBHOOK_SECRET)",
    ),
]


def _unique(ids: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for volume_id in ids:
        if volume_id in seen:
            raise ValueError(f"{what} lists volume {volume_id} twice; give each volume once")
        seen.add(volume_id)
    return ids


def _check_crop(value: object, what: str) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be 'auto' or a positive multiple of 8, got {value!r}")
    if value < 8 or value % 8:
        raise ValueError(f"{what} must be a positive multiple of 8 (e.g. 128), got {value}")
    return value


class TrainSpec(BaseModel):
    """A training job: image and mask volumes paired by position, plus hyper-parameters."""

    model_config = ConfigDict(extra="forbid")

    image_ids: list[VolumeId] = Field(min_length=1, max_length=MAX_IDS)
    mask_ids: list[VolumeId] = Field(min_length=1, max_length=MAX_IDS)
    val_image_ids: list[VolumeId] | None = Field(None, max_length=MAX_IDS)
    val_mask_ids: list[VolumeId] | None = Field(None, max_length=MAX_IDS)
    val_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="fraction held out for validation when no validation volumes are given "
        f"(default {option_default('val_fraction')})",
    )
    dims: Literal[2, 3] = 2
    epochs: int = Field(option_default("epochs"), ge=1, le=100_000)
    max_time_minutes: float | None = Field(option_default("max_time_minutes"), gt=0, le=7 * 24 * 60)
    batch_size: int | None = Field(option_default("batch_size"), ge=1, le=1024)
    crop_size: int | Literal["auto"] = option_default("crop_size")
    lr: float = Field(option_default("lr"), gt=0, le=1)
    center: CenterMode = option_default("center")
    voxel_size: list[float] | None = option_default("voxel_size")
    seed: int = Field(option_default("seed"), ge=0, le=2**32 - 1)
    amp: bool = option_default("amp")
    min_object_size: int | None = Field(
        option_default("min_object_size"),
        ge=0,
        le=10**9,
        description="override the data-derived minimum object size (pixels)",
    )
    foreground_weight: float | None = Field(
        option_default("foreground_weight"),
        gt=0,
        le=1000,
        description="override the data-derived foreground weight of the seed loss",
    )
    name: str | None = Field(None, max_length=255)
    callback_url: CallbackUrl = None
    queue: JobQueue = None

    @field_validator("crop_size", mode="before")
    @classmethod
    def _crop(cls, value: object) -> int | str:
        crop = _check_crop(value, "crop_size")
        if isinstance(crop, int) and crop > MAX_CROP_SIZE:
            raise ValueError(f"crop_size must be at most {MAX_CROP_SIZE} (or 'auto'), got {crop}")
        return crop

    @field_validator("voxel_size")
    @classmethod
    def _voxel(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) not in (2, 3) or any(not math.isfinite(v) or v <= 0 for v in value)):
            raise ValueError("voxel_size must be 2 (y,x) or 3 (z,y,x) positive numbers in array order")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> TrainSpec:
        if len(self.image_ids) != len(self.mask_ids):
            raise ValueError(
                f"image_ids has {len(self.image_ids)} volumes but mask_ids has {len(self.mask_ids)}; "
                "give one mask per image, in the same order"
            )
        _unique(self.image_ids, "image_ids")
        _unique(self.mask_ids, "mask_ids")
        if (self.val_image_ids is None) != (self.val_mask_ids is None):
            raise ValueError("give both val_image_ids and val_mask_ids, or neither")
        if self.val_image_ids is not None:
            if self.val_fraction is not None:
                raise ValueError(
                    "give either validation volumes (val_image_ids, val_mask_ids) or val_fraction, not both"
                )
            assert self.val_mask_ids is not None
            if len(self.val_image_ids) != len(self.val_mask_ids):
                raise ValueError(
                    f"val_image_ids has {len(self.val_image_ids)} volumes but val_mask_ids has "
                    f"{len(self.val_mask_ids)}; give one mask per image, in the same order"
                )
            if not self.val_image_ids:
                raise ValueError("val_image_ids is empty; leave it out to split off val_fraction instead")
            _unique(self.val_image_ids, "val_image_ids")
            _unique(self.val_mask_ids, "val_mask_ids")
            overlap = set(self.val_image_ids) & set(self.image_ids)
            if overlap:
                raise ValueError(
                    f"volume {sorted(overlap)[0]} is both a training and a validation image; "
                    "validation images must be held out"
                )
        if self.voxel_size is not None and len(self.voxel_size) != self.dims:
            raise ValueError(f"voxel_size has {len(self.voxel_size)} values but dims is {self.dims}")
        return self

    def training_options(self) -> dict[str, Any]:
        """The training options of this spec (all fields but the volumes and the name), for
        :func:`embedseg_service.core.training.config.config_from_options`."""
        return self.model_dump(
            exclude={"image_ids", "mask_ids", "val_image_ids", "val_mask_ids", "name", "callback_url", "queue"}
        )

    def volume_roles(self) -> list[tuple[str, str]]:
        """(volume_id, role) pairs this job reads."""
        roles = [(i, "image") for i in self.image_ids] + [(i, "mask") for i in self.mask_ids]
        roles += [(i, "val_image") for i in self.val_image_ids or []]
        roles += [(i, "val_mask") for i in self.val_mask_ids or []]
        return roles


def check_train_size(spec: TrainSpec, image_shapes: Sequence[Sequence[int]], *, max_batch_voxels: int) -> None:
    """Refuse a training spec too large for its data or for one batch, with a ``ValueError`` saying how to fix it.

    ``image_shapes`` are the spatial shapes of the spec's training images. Rules: each side of an
    explicit ``crop_size`` is at most the largest side of those images rounded up to a multiple of
    8; ``batch_size`` times the crop's voxels (``crop_size ** dims``) is at most
    ``max_batch_voxels`` (an automatic batch size counts as 1, an automatic crop is sized by the
    trainer and not checked here).
    """
    if not isinstance(spec.crop_size, int):
        return
    crop = spec.crop_size
    largest = max((int(n) for shape in image_shapes for n in shape), default=0)
    limit = -(-largest // 8) * 8
    if image_shapes and crop > limit:
        raise ValueError(
            f"crop_size {crop} is larger than the training images need (their largest side is {largest}); "
            f"use at most {limit}, or 'auto'"
        )
    batch = spec.batch_size or 1
    voxels = batch * crop**spec.dims
    if voxels > max_batch_voxels:
        raise ValueError(
            f"batch_size {batch} times a crop of {crop}^{spec.dims} voxels is {voxels} voxels per batch, more "
            f"than the limit of {max_batch_voxels} (EMBEDSEG_MAX_BATCH_VOXELS); use a smaller batch_size or "
            "crop_size"
        )


class PredictSpec(BaseModel):
    """A prediction job: a model applied to one or many volumes, optionally scored against ground truth."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(min_length=1, max_length=64, pattern=ID_PATTERN)
    volume_ids: list[VolumeId] = Field(min_length=1, max_length=MAX_IDS)
    tta: bool = DEFAULT_TTA
    tile: Literal["auto"] | list[int] = "auto"
    min_size: int | None = Field(
        None,
        ge=0,
        le=10**9,
        description="objects need more pixels than this (default: the model's minimum object size)",
    )
    gt_ids: list[VolumeId] | None = Field(None, max_length=MAX_IDS)
    callback_url: CallbackUrl = None
    queue: JobQueue = None

    @field_validator("tile", mode="before")
    @classmethod
    def _tile(cls, value: object) -> object:
        if value == "auto":
            return value
        if not isinstance(value, (list, tuple)) or len(value) not in (2, 3):
            raise ValueError("tile must be 'auto' or 2 (y,x) or 3 (z,y,x) sizes, each a positive multiple of 8")
        for size in value:
            _check_crop(size, "each tile size")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> PredictSpec:
        _unique(self.volume_ids, "volume_ids")
        if self.gt_ids is not None and len(self.gt_ids) != len(self.volume_ids):
            raise ValueError(
                f"gt_ids has {len(self.gt_ids)} volumes but volume_ids has {len(self.volume_ids)}; "
                "give one ground-truth mask per volume, in the same order"
            )
        return self

    def volume_roles(self) -> list[tuple[str, str]]:
        roles = [(i, "input") for i in self.volume_ids]
        roles += [(i, "gt") for i in self.gt_ids or []]
        return roles


class EvalPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gt_id: VolumeId
    pred_id: VolumeId


class EvaluateSpec(BaseModel):
    """An evaluation job: average precision of predicted label volumes against ground truth."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[EvalPair] = Field(min_length=1, max_length=MAX_IDS)
    thresholds: list[float] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="IoU thresholds (default: the standard ones of the volumes' dimensionality, "
        "embedseg_service.core.metrics.default_thresholds)",
    )
    callback_url: CallbackUrl = None
    queue: JobQueue = None

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if any(not 0 < t <= 1 for t in value):
            raise ValueError("every IoU threshold must be in (0, 1], e.g. [0.5, 0.75]")
        return sorted(set(value))

    def volume_roles(self) -> list[tuple[str, str]]:
        roles = [(pair.gt_id, "gt") for pair in self.pairs]
        roles += [(pair.pred_id, "pred") for pair in self.pairs]
        return roles


SPEC_BY_KIND: dict[JobKind, type[BaseModel]] = {
    JobKind.train: TrainSpec,
    JobKind.predict: PredictSpec,
    JobKind.evaluate: EvaluateSpec,
}


class CallbackOut(BaseModel):
    """The delivery of a job's webhook (read-only; ``Job.callback`` without its internal lease)."""

    url: str
    event: str = Field(description="job.succeeded, job.failed or job.cancelled (header X-EmbedSeg-Event)")
    delivery_id: str = Field(description="the same on every attempt (header X-EmbedSeg-Delivery)")
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status: int | None = Field(None, description="HTTP status of the receiver's last answer")
    last_error: str | None = None
    delivered_at: datetime | None = None
    next_attempt_at: datetime | None = None


class JobOut(Orm):
    id: str
    kind: JobKind
    status: JobStatus
    stage: str | None = None
    progress: float
    eta_s: float | None = None
    spec: dict[str, Any]
    metrics: dict[str, Any] | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    worker: str | None = None
    queue: str | None = Field(None, description="broker queue the job was sent to (null: EMBEDSEG_GPU_QUEUE)")
    device: str | None = Field(
        None, description="device of the worker process that ran it last: cpu, or cuda:N (CUDA_VISIBLE_DEVICES=...)"
    )
    cancel_requested: bool
    attempts: int
    owner: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    callback: CallbackOut | None = Field(
        None, description="webhook delivery of a finished job whose spec names a callback_url; null otherwise"
    )


class ObjectOut(BaseModel):
    """One object of a label volume a predict job produced. Per-axis lists are in array order (``z, y, x``
    or ``y, x``); pixel indices start at 0, bounding boxes are inclusive."""

    volume_id: str = Field(description="The input image volume")
    labels_id: str = Field(description="The label volume the job made of it")
    label: int = Field(description="The object's label id in the label volume")
    voxel_count: int
    centroid: list[float] = Field(description="Mean pixel index per axis")
    centroid_physical: list[float] | None = Field(
        default=None, description="centroid × the volume's voxel size; null when the volume has none"
    )
    bbox_min: list[int]
    bbox_max: list[int]
    gt_volume_id: str | None = Field(default=None, description="The ground-truth volume given for it (gt_ids)")
    gt_label: int | None = Field(
        default=None, description="The ground-truth object matched one-to-one at IoU >= 0.5 (as AP at 0.5 counts it)"
    )
    iou: float | None = Field(
        default=None,
        description="IoU with the matched ground-truth object; unmatched: the largest IoU with any; null without GT",
    )


# --------------------------------------------------------------------------- models


class ModelOut(Orm):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: str
    name: str
    spatial_dims: int
    config: dict[str, Any]
    data_properties: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    size_bytes: int
    source_job_id: str | None = None
    owner: str | None = None
    provenance: dict[str, Any] | None = Field(
        default=None,
        description="Where the model comes from: `origin` (`trained` or `uploaded`), library versions, seed, the "
        "training job and the sha256 of every training and validation volume, or the uploaded file's sha256",
    )
    created_at: datetime


# --------------------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    database: str
    broker: str
    storage: str


# --------------------------------------------------------------------------- workers


class WorkerOut(Orm):
    """A process that runs jobs, as it last reported itself, with the jobs it is running now."""

    name: str = Field(description="host:pid, as recorded on the jobs it runs (`worker` of a job)")
    host: str
    pid: int
    queues: str | None = Field(None, description="queues it consumes (`local` for the embedded worker)")
    device: str | None = Field(None, description="cuda:N or cpu once it has run a job; null before")
    gpu_memory_bytes: int | None = Field(None, description="GPU memory its torch allocator holds")
    gpu_memory_total_bytes: int | None = None
    started_at: datetime
    seen_at: datetime
    running_job_ids: list[str] = Field(default_factory=list)
