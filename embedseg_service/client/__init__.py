"""Python client of the EmbedSeg Service REST API (httpx; no torch, FastAPI or database needed).

>>> with Client("http://127.0.0.1:8000") as api:  # doctest: +SKIP
...     image = api.upload("image.tif")
...     job = api.wait(api.predict(model_id, [image]))
...     labels = api.download_labels(job.result["label_volume_ids"][0])

Of the service it imports only the response bodies (:mod:`embedseg_service.records.schemas` and
the status enums of :mod:`embedseg_service.records.orm`) and the TIFF reading and writing of
:mod:`embedseg_service.core.data`.
"""

from embedseg_service.client.client import API_KEY_ENV, Client
from embedseg_service.client.errors import (
    ApiError,
    ClientError,
    ConnectionFailed,
    JobFailed,
    NotFound,
    Unauthorized,
    WaitInterrupted,
    WaitTimeout,
)
from embedseg_service.client.retries import RetryPolicy

__all__ = [
    "API_KEY_ENV",
    "ApiError",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "JobFailed",
    "NotFound",
    "RetryPolicy",
    "Unauthorized",
    "WaitInterrupted",
    "WaitTimeout",
]
