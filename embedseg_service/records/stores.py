"""The storage the settings name: a local folder, or an S3-compatible object store with a local cache."""

from __future__ import annotations

from embedseg_service.records.settings import Settings, get_settings
from embedseg_service.records.storage import LocalStorage, Storage


def get_storage(settings: Settings | None = None) -> Storage:
    """:class:`~embedseg_service.records.object_storage.S3Storage` when ``storage_url`` is set (boto3 is
    loaded then only), else a :class:`~embedseg_service.records.storage.LocalStorage` under ``storage_path``."""
    settings = settings or get_settings()
    if settings.storage_url is None:
        return LocalStorage(settings.storage_path)
    from embedseg_service.records.object_storage import S3Storage

    return S3Storage.from_settings(settings)
