"""Settings: environment variables, derived paths and refusals of unsafe values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from embedseg_service.records import settings as settings_module
from embedseg_service.records.settings import Settings, get_settings, set_settings


def test_defaults_derive_from_data_dir(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("DATA_DIR", "DATABASE_URL", "BROKER_URL", "STORAGE_DIR"):
        monkeypatch.delenv(f"EMBEDSEG_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)
    assert settings.data_dir == Path("embedseg-data")
    assert settings.database_url_resolved == f"sqlite:///{tmp_path / 'embedseg-data' / 'embedseg.db'}"
    assert settings.storage_path == Path("embedseg-data") / "storage"
    assert settings.embedded and settings.is_sqlite
    assert settings.gpu_queue == "gpu"


def test_environment_variables_with_prefix(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMBEDSEG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EMBEDSEG_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/embedseg")
    monkeypatch.setenv("EMBEDSEG_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("EMBEDSEG_MAX_UPLOAD_BYTES", "1000000")
    monkeypatch.setenv("EMBEDSEG_UPLOAD_CHUNK_BYTES", "65536")
    monkeypatch.setenv("EMBEDSEG_CORS_ORIGINS", '["https://lab.example"]')
    settings = Settings(_env_file=None)
    assert settings.database_url_resolved == "postgresql+psycopg://u:p@db:5432/embedseg"
    assert not settings.embedded and not settings.is_sqlite
    assert settings.max_upload_bytes == 1_000_000
    assert settings.storage_path == tmp_path / "storage"
    assert settings.cors_origins == ["https://lab.example"]


def test_empty_broker_url_means_embedded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMBEDSEG_BROKER_URL", "")
    assert Settings(_env_file=None).broker_url is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"database_url": "postgresql://u@h/db"},
            "database_url must name the psycopg 3 driver: write postgresql+psycopg://user:pass@host/db",
        ),
        (
            {"database_url": "mysql://u@h/db"},
            "database_url must be sqlite:///path or postgresql+psycopg://user:pass@host/db",
        ),
        (
            {"broker_url": "amqp://guest@rabbit//"},
            "broker_url must be a Redis URL (redis://host:6379/0) or unset for the local worker",
        ),
        ({"max_upload_bytes": 0}, "max_upload_bytes must be a positive integer, got 0"),
        ({"local_workers": -1}, "local_workers must be a positive integer, got -1"),
        ({"progress_throttle_s": 0}, "progress_throttle_s must be > 0, got 0.0"),
        ({"gpu_queue": "gpu queue"}, "gpu_queue must be 1-64 characters of letters, digits, '_', '.', ':' or '-'"),
        (
            {"cors_origins": ["lab.example"]},
            "cors origin 'lab.example' must start with http:// or https:// (or be '*')",
        ),
        (
            {"upload_chunk_bytes": 128 * 1024**2},
            "upload_chunk_bytes must be at most 64 MiB so that uploads stay streamed",
        ),
        ({"max_upload_bytes": 1000, "upload_chunk_bytes": 2000}, "upload_chunk_bytes must not exceed max_upload_bytes"),
        (
            {"job_visibility_timeout_s": 3600, "max_job_minutes": 120},
            "job_visibility_timeout_s must exceed the longest job (max_job_minutes * 60 = 7200 s), "
            "or the broker redelivers running jobs",
        ),
    ],
)
def test_unsafe_values_are_refused(values, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, **values)
    assert message in str(raised.value)


def test_get_settings_is_cached_and_overridable(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMBEDSEG_DATA_DIR", str(tmp_path / "a"))
    set_settings(None)
    try:
        first = get_settings()
        assert first is get_settings()
        assert first.data_dir == tmp_path / "a"
        override = Settings(_env_file=None, data_dir=tmp_path / "b")
        set_settings(override)
        assert get_settings() is override
        set_settings(None)
        monkeypatch.setenv("EMBEDSEG_DATA_DIR", str(tmp_path / "c"))
        assert get_settings().data_dir == tmp_path / "c"
    finally:
        set_settings(None)
        settings_module._load.cache_clear()


def test_object_store_settings(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EMBEDSEG_STORAGE_URL", "s3://lab-bucket/embedseg/prod/")
    monkeypatch.setenv("EMBEDSEG_S3_ENDPOINT_URL", "http://seaweedfs:8333")
    monkeypatch.setenv("EMBEDSEG_DATA_DIR", str(tmp_path))
    settings = Settings(_env_file=None)
    assert settings.storage_url == "s3://lab-bucket/embedseg/prod"
    assert settings.cache_path == tmp_path / "cache" and settings.cache_max_bytes == 20 * 1024**3
    assert settings.s3_part_bytes == 8 * 1024**2 and settings.s3_region is None
    monkeypatch.setenv("EMBEDSEG_STORAGE_URL", "")
    assert Settings(_env_file=None).storage_url is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"storage_url": "s3://B/x"}, "storage_url must be s3://bucket or s3://bucket/prefix: a bucket name of 3-63"),
        ({"storage_url": "gs://bucket"}, "storage_url must be s3://bucket or s3://bucket/prefix"),
        ({"storage_url": "s3://bucket/a/../b"}, "storage_url must be s3://bucket or s3://bucket/prefix"),
        ({"s3_endpoint_url": "seaweedfs:8333"}, "s3_endpoint_url must be http(s)://host[:port]"),
        ({"s3_part_bytes": 1024**2}, "greater than or equal to 5242880"),
        ({"cache_max_bytes": 0}, "greater than 0"),
        (
            {"storage_url": "s3://bucket", "storage_dir": "/srv/files"},
            "set either storage_dir (a local folder) or storage_url (an object store), not both",
        ),
    ],
)
def test_bad_object_store_settings_are_refused(values, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **values)
    assert message in str(caught.value)
