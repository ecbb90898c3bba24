"""Database tables (SQLAlchemy 2.0 declarative): volumes, jobs, models and the job-volume links.

Every row records its ``owner`` (``None`` on the embedded default) so that per-owner access
and quotas can follow without changing what existing rows mean.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from embedseg_service.core.data.axes import channel_count, spatial_shape
from embedseg_service.records.storage import OME_ZARR_ZIP_SUFFIX

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class VolumeKind(str, enum.Enum):
    """What a stored volume holds: an intensity ``image`` or a ``labels`` image (0 = background)."""

    image = "image"
    labels = "labels"


class VolumeFormat(str, enum.Enum):
    """How a stored volume's pixels are kept: one ``tiff`` file, or a zipped ``ome-zarr`` store (read by chunks)."""

    tiff = "tiff"
    ome_zarr = "ome-zarr"


class JobKind(str, enum.Enum):
    train = "train"
    predict = "predict"
    evaluate = "evaluate"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
ACTIVE_STATUSES = frozenset({JobStatus.queued, JobStatus.running})


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A new random row id (UUID4, 36 characters)."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ARG002 - SQLAlchemy's signature
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ARG002 - SQLAlchemy's signature
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _in(column: str, enum_cls: type[enum.Enum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    return f"{column} IN ({values})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    def __init__(self, **kwargs: Any) -> None:
        """Set the given attributes; a row with an ``id`` column gets a new id at once (not at flush),
        so it can be referenced (e.g. in a job's result) before it is inserted."""
        if "id" in self.__table__.columns and kwargs.get("id") is None:
            kwargs["id"] = new_id()
        cls = type(self)
        for key, value in kwargs.items():
            if not hasattr(cls, key):
                raise TypeError(f"{key!r} is an invalid keyword argument for {cls.__name__}")
            setattr(self, key, value)


class Job(Base):
    """A train, predict or evaluate job; the row is the truth for status, progress and results."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JobKind), name="kind"),
        CheckConstraint(_in("status", JobStatus), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(255))
    queue: Mapped[str | None] = mapped_column(String(64))
    """Broker queue the job is sent to; None (rows from before queues): ``Settings.gpu_queue``."""
    device: Mapped[str | None] = mapped_column(String(64))
    """Device of the worker process of its latest claim (``cpu``, ``cuda:0 (CUDA_VISIBLE_DEVICES=1)``)."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lost_workers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Claims that ended because their worker vanished (not a graceful stop); too many fail the job."""
    callback: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Delivery record of the job's webhook (``spec.callback_url``): state, attempts, last error."""

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r}, status={self.status!r})"


class Volume(Base):
    """An uploaded or produced TIFF volume (2D or 3D, optional channel axis)."""

    __tablename__ = "volumes"
    __table_args__ = (
        CheckConstraint(_in("kind", VolumeKind), name="kind"),
        Index("ix_volumes_owner_created_at", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16), default=VolumeKind.image.value)
    sha256: Mapped[str] = mapped_column(String(64))
    shape: Mapped[list[int]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    axes: Mapped[str] = mapped_column(String(8))
    voxel_size: Mapped[list[float] | None] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source_job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    image_volume_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("volumes.id", ondelete="SET NULL"), index=True
    )

    @property
    def spatial_shape(self) -> list[int]:
        """``shape`` without its channel axis: ``[Z, Y, X]`` or ``[Y, X]``."""
        return list(spatial_shape(self.shape, self.axes))

    @property
    def n_channels(self) -> int:
        """Number of channels (1 without a channel axis)."""
        return channel_count(self.shape, self.axes)

    @property
    def format(self) -> str:
        """How the volume is stored: ``ome-zarr`` (a zipped OME-Zarr store, its key ends in ``.ome.zarr.zip``)
        or ``tiff``."""
        zipped = self.storage_key.endswith(OME_ZARR_ZIP_SUFFIX)
        return VolumeFormat.ome_zarr.value if zipped else VolumeFormat.tiff.value

    def __repr__(self) -> str:
        return f"Volume(id={self.id!r}, kind={self.kind!r}, shape={self.shape!r})"


class Model(Base):
    """A trained segmentation model (checkpoint in storage)."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint("spatial_dims IN (2, 3)", name="spatial_dims"),
        Index("ix_models_owner_created_at", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    spatial_dims: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    data_properties: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(512), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source_job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Package and torch versions, seed, sha256 of each training volume, training job."""
    export_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """Bytes of the stored exports of the network (they count in the owner's stored bytes)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Model(id={self.id!r}, name={self.name!r}, spatial_dims={self.spatial_dims!r})"


class WorkerProcess(Base):
    """A process that runs jobs (a Celery pool process or an embedded local worker), seen at each beat.

    ``name`` is the ``host:pid`` recorded on the jobs it runs (``Job.worker``). GPU memory is what the
    process's torch caching allocator holds on its device (``None`` until it has used CUDA).
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    def __repr__(self) -> str:
        return f"WorkerProcess(name={self.name!r}, device={self.device!r})"


class JobVolume(Base):
    """A volume a job reads (``role``: image, mask, val_image, val_mask, input, gt, pred).

    A linked volume cannot be deleted (``RESTRICT``): deleting a volume first removes the links of
    finished jobs, and refuses while a queued or running job's link remains.
    """

    __tablename__ = "job_volumes"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    volume_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("volumes.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(32), primary_key=True)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; ``prefix`` (its first characters) names it in listings.

    A request with the key acts as ``owner``; an ``admin`` key sees and touches every owner's rows.
    A revoked key (``revoked_at`` set) is refused. The table's having any row at all, revoked or
    not, is what makes the API require keys.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, owner={self.owner!r}, prefix={self.prefix!r}, admin={self.admin!r})"


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` on a creating POST: the request it was first used with, and what it made.

    ``scope`` is the owner ('' for anonymous requests): keys of different owners never collide.
    ``resource_id`` is None while the first request is still being handled.
    """

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    route: Mapped[str] = mapped_column(String(64))
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
