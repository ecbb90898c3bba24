"""Service settings, read from ``EMBEDSEG_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from embedseg_service.core.inference.defaults import DEFAULT_PRECISION, InferencePrecision

QUEUE_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
"""What a broker queue name may look like (the gpu_queue setting, the queues setting and a job's ``queue``)."""
_QUEUE_NAME = re.compile(QUEUE_PATTERN)
_STORAGE_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9][A-Za-z0-9._-]{0,127})*/?$")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
"""The host names of this machine's loopback interface (the default ``allowed_hosts``)."""


class Settings(BaseSettings):
    """Configuration of the API, the database, the broker, storage and the workers.

    Every field can be set by the environment variable ``EMBEDSEG_<FIELD>`` (upper case).
    Paths left empty are derived from ``data_dir``.
    """

    model_config = SettingsConfigDict(env_prefix="EMBEDSEG_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path("embedseg-data"), description="Folder of the embedded default's database and files."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file embedseg.db in data_dir."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...); unset: jobs run on an embedded local worker."
    )
    storage_dir: Path | None = Field(
        default=None, description="Folder of stored volumes and models; default data_dir/storage."
    )
    storage_url: str | None = Field(
        default=None,
        description="Object store of volumes, models and job outputs, s3://bucket or s3://bucket/prefix; unset: "
        "the folder storage_dir. Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, ...).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="URL of an S3-compatible server (path-style addressing); unset: AWS S3."
    )
    s3_region: str | None = Field(
        default=None, description="Region of the bucket; unset: AWS_DEFAULT_REGION, else us-east-1."
    )
    s3_part_bytes: int = Field(
        default=8 * 1024**2,
        ge=5 * 1024**2,
        le=5 * 1024**3,
        description="Size of the parts an upload to the object store is sent in (5 MiB to 5 GiB).",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Folder of this process's checksum-verified copies of objects (with storage_url); "
        "default data_dir/cache.",
    )
    cache_max_bytes: int = Field(
        default=20 * 1024**3, gt=0, description="Bytes the local copies of objects may take (least recently used go)."
    )
    max_upload_bytes: int = Field(default=4 * 1024**3, description="Largest accepted upload (413 above).")
    upload_chunk_bytes: int = Field(default=1024 * 1024, description="Size of the chunks an upload is written in.")
    job_visibility_timeout_s: int = Field(
        default=48 * 3600, description="Broker visibility timeout; must exceed the longest job."
    )
    max_job_minutes: float = Field(default=24 * 60, description="Longest time budget a training job may ask for.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty: no CORS.")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_NAMES),
        description="Host names the API answers (the Host header, without port); '*.example.org' matches "
        "subdomains, '*' any host. Others get 400, which defeats DNS rebinding.",
    )
    quota_stored_bytes: int = Field(
        default=1024**4, description="Bytes of volumes and models one owner may store (413 above)."
    )
    quota_queued_jobs: int = Field(default=200, description="Jobs one owner may have waiting in the queue (429 above).")
    quota_running_jobs: int = Field(
        default=4, description="Jobs of one owner that run at once; the owner's other jobs wait in the queue."
    )
    progress_throttle_s: float = Field(default=1.0, description="Least seconds between two progress writes of one job.")
    heartbeat_s: float = Field(default=30.0, description="Seconds between worker heartbeats on a running job.")
    requeue_after_s: float = Field(
        default=300.0,
        description="Seconds a queued job may wait with no message in the broker queue before a worker's "
        "reconciler sends it again (e.g. after a broker restart lost the queue); /ready reports such jobs.",
    )
    local_workers: int = Field(default=1, description="Jobs the embedded local worker runs at once.")
    model_cache_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Memory the models a worker process keeps loaded between jobs may take (the least recently "
        "used go first); 0: every job loads its model.",
    )
    inference_batch_voxels: int | None = Field(
        default=None,
        ge=0,
        description="Most voxels of the same-shape images of a predict job that run through the network together; "
        "unset: the device's default; 0: one image at a time.",
    )
    inference_precision: InferencePrecision = Field(
        default=DEFAULT_PRECISION,
        description="Number format of the network at prediction: fp32, bf16 (autocast, CPU or CUDA) or fp16 "
        "(autocast, CUDA only: a predict job on a CPU worker fails saying so).",
    )
    stream_above_bytes: int = Field(
        default=1024**3,
        ge=0,
        description="A predict job streams a volume (docs/method.md §11.5: read by regions, labels written as a zipped "
        "OME-Zarr store) when its float32 size exceeds this many bytes, and always an OME-Zarr volume.",
    )
    gpu_queue: str = Field(default="gpu", description="Celery queue the GPU workers consume.")
    queues: list[str] = Field(
        default_factory=list,
        description='Broker queues a job may name (its "queue"), e.g. ["gpu", "gpu-large"]; they must include '
        "gpu_queue, the queue of jobs that name none. Empty: gpu_queue only.",
    )
    task_name: str = Field(default="embedseg.run_job", description="Name of the Celery task that runs a job.")
    page_limit_max: int = Field(default=500, description="Largest page size a list route answers.")
    preview_max_px: int = Field(default=1024, description="Longest side of a preview.png.")
    max_voxels: int = Field(
        default=2**31,
        gt=0,
        description="Most voxels (all axes, channels included) a TIFF may declare; checked from its header "
        "before any pixel is decoded (413 above).",
    )
    max_batch_voxels: int = Field(
        default=2**27,
        gt=0,
        description="Most voxels of one training batch, batch_size times the crop's voxels (422 above).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Key of the HMAC-SHA256 signature of webhook deliveries (at least 16 characters); "
        "unset: a job spec with a callback_url is refused (422).",
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) webhooks may reach besides public addresses, e.g. the lab's intranet; "
        "loopback, link-local, private and other internal targets are refused otherwise.",
    )
    webhook_attempts: int = Field(default=8, ge=1, le=100, description="Most attempts of one webhook delivery.")
    webhook_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before the second attempt of a webhook; doubled for each further one."
    )
    webhook_max_delay_s: float = Field(
        default=120.0, gt=0, description="Longest wait between two webhook attempts (also caps Retry-After)."
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Seconds to connect, send and get the answer of one attempt."
    )
    sql_echo: bool = Field(default=False, description="Log every SQL statement.")

    @field_validator("data_dir", "storage_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator(
        "database_url", "broker_url", "webhook_secret", "storage_url", "s3_endpoint_url", "s3_region", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("postgres://") or value.startswith("postgresql://"):
            raise ValueError(
                "database_url must name the psycopg 3 driver: write postgresql+psycopg://user:pass@host/db"
            )
        if not (value.startswith("sqlite") or value.startswith("postgresql+psycopg")):
            raise ValueError("database_url must be sqlite:///path or postgresql+psycopg://user:pass@host/db")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError("broker_url must be a Redis URL (redis://host:6379/0) or unset for the local worker")
        return value

    @field_validator(
        "max_upload_bytes",
        "upload_chunk_bytes",
        "job_visibility_timeout_s",
        "local_workers",
        "page_limit_max",
        "preview_max_px",
        "quota_stored_bytes",
        "quota_queued_jobs",
        "quota_running_jobs",
    )
    @classmethod
    def _positive(cls, value: int, info: ValidationInfo) -> int:
        if value <= 0:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}")
        return value

    @field_validator("progress_throttle_s", "heartbeat_s", "requeue_after_s", "max_job_minutes")
    @classmethod
    def _positive_float(cls, value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @field_validator("gpu_queue")
    @classmethod
    def _check_queue(cls, value: str) -> str:
        if not _QUEUE_NAME.match(value):
            raise ValueError("gpu_queue must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _QUEUE_NAME.match(name):
                raise ValueError(f"queues: {name!r} must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return list(dict.fromkeys(value))

    @field_validator("cors_origins")
    @classmethod
    def _check_cors(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"cors origin {origin!r} must start with http:// or https:// (or be '*')")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        hosts = [host.strip().lower().strip("[]") for host in value if host.strip()]
        if not hosts:
            raise ValueError("allowed_hosts must name at least one host (or be '*')")
        for host in hosts:
            with_port = host.count(":") == 1  # an IPv6 address has several colons
            if "/" in host or with_port:
                raise ValueError(f"allowed host {host!r} must be a bare host name, without scheme or port")
        return hosts

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError(
                "webhook_secret must be at least 16 characters, e.g. the output of "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        networks = []
        for text in value:
            try:
                networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"webhook_allowed_networks: {text!r} is not a network; write a CIDR such as 10.0.0.0/8 "
                    "or 192.0.2.7/32"
                ) from None
        return networks

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value is not None and not _STORAGE_URL.match(value):
            raise ValueError(
                "storage_url must be s3://bucket or s3://bucket/prefix: a bucket name of 3-63 lower-case letters, "
                "digits, '.' or '-', and prefix segments of letters, digits, '.', '_' or '-'"
            )
        return None if value is None else value.rstrip("/")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError("s3_endpoint_url must be http(s)://host[:port], e.g. http://seaweedfs:8333")
        return value

    @model_validator(mode="after")
    def _check_default_queue(self) -> Settings:
        if self.queues and self.gpu_queue not in self.queues:
            raise ValueError(
                f"queues must include gpu_queue {self.gpu_queue!r}, the queue of jobs that name none; "
                f"got {', '.join(self.queues)}"
            )
        return self

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        if self.storage_url is not None and self.storage_dir is not None:
            raise ValueError("set either storage_dir (a local folder) or storage_url (an object store), not both")
        return self

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.upload_chunk_bytes > 64 * 1024**2:
            raise ValueError("upload_chunk_bytes must be at most 64 MiB so that uploads stay streamed")
        if self.upload_chunk_bytes > self.max_upload_bytes:
            raise ValueError("upload_chunk_bytes must not exceed max_upload_bytes")
        if self.job_visibility_timeout_s < self.max_job_minutes * 60:
            raise ValueError(
                "job_visibility_timeout_s must exceed the longest job (max_job_minutes * 60 = "
                f"{self.max_job_minutes * 60:g} s), or the broker redelivers running jobs"
            )
        return self

    @property
    def database_url_resolved(self) -> str:
        """The database URL in use: ``database_url`` or SQLite in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'embedseg.db').resolve()}"

    @property
    def storage_path(self) -> Path:
        """Folder of stored files: ``storage_dir`` or ``data_dir/storage``."""
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "storage"

    @property
    def cache_path(self) -> Path:
        """Folder of the local copies of objects: ``cache_dir`` or ``data_dir/cache``."""
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"

    @property
    def job_queues(self) -> list[str]:
        """The broker queues a job may name: ``queues``, or ``gpu_queue`` alone when that is empty."""
        return list(self.queues) or [self.gpu_queue]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url_resolved.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """True when jobs run on the embedded local worker (no broker configured)."""
        return self.broker_url is None


_override: Settings | None = None


@lru_cache(maxsize=1)
def _load() -> Settings:
    return Settings()


def get_settings() -> Settings:
    """The process's settings: an override set by :func:`set_settings`, else read once from the environment."""
    if _override is not None:
        return _override
    return _load()


def set_settings(settings: Settings | None) -> None:
    """Replace the settings :func:`get_settings` returns (``None`` drops the override and the cache)."""
    global _override
    _override = settings
    _load.cache_clear()
