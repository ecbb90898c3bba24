"""The flow every upload route shares: quota, streamed receipt, ``Idempotency-Key`` replay, store, ``Location``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from embedseg_service.api import idempotency
from embedseg_service.api.auth import Principal, PrincipalDep
from embedseg_service.api.deps import SessionDep, SettingsDep, StorageDep
from embedseg_service.api.quotas import check_received, check_storage
from embedseg_service.api.uploads import ReceivedUpload, UploadRejected, receive_upload
from embedseg_service.records.orm import Model, Volume
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import Storage

R = TypeVar("R", Volume, Model)


@dataclass
class Uploader:
    """What an upload route needs of its request (one dependency: :data:`UploaderDep`)."""

    request: Request
    response: Response
    session: Session
    settings: Settings
    storage: Storage
    principal: Principal

    async def store(
        self,
        *,
        cls: type[R],
        storage_key: str,
        fields: Sequence[str],
        store: Callable[[ReceivedUpload], R],
        max_voxels: int | None = None,
    ) -> R:
        """Receive the multipart body into ``storage_key`` within the caller's quota and hand it to
        ``store`` (run in the threadpool; it checks, commits the file and inserts the row), or return the
        row an earlier request with the same ``Idempotency-Key`` made. Sets the answer's ``Location``."""
        return await store_upload(self, cls, storage_key, fields, store, max_voxels)


def get_uploader(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    principal: PrincipalDep,
) -> Uploader:
    return Uploader(request, response, session, settings, storage, principal)


UploaderDep = Annotated[Uploader, Depends(get_uploader)]


async def store_upload(
    up: Uploader,
    cls: type[R],
    storage_key: str,
    fields: Sequence[str],
    store: Callable[[ReceivedUpload], R],
    max_voxels: int | None,
) -> R:
    """:meth:`Uploader.store`."""
    request, response, session, settings, principal = up.request, up.response, up.session, up.settings, up.principal
    key = idempotency.request_key(request)
    route = f"POST /{cls.__tablename__}"
    await run_in_threadpool(check_storage, session, settings, principal)
    held: idempotency.Claim | str | None = None
    try:
        received = await receive_upload(
            request,
            up.storage,
            storage_key,
            max_bytes=settings.max_upload_bytes,
            chunk_bytes=settings.upload_chunk_bytes,
            fields=fields,
            max_voxels=max_voxels,
        )
        if key is not None:
            held = await run_in_threadpool(idempotency.claim_received, session, principal, key, route, received)
            if isinstance(held, str):
                return idempotency.replay(request, response, session, cls, held, key)
        with idempotency.holding(session, held):
            await run_in_threadpool(check_received, session, settings, principal, received.pending)
            row = await run_in_threadpool(store, received)
        if held is not None:
            await run_in_threadpool(idempotency.settle, session, held, row.id)
    except UploadRejected as rejected:
        raise HTTPException(status_code=rejected.status, detail=rejected.detail) from None
    except ClientDisconnect:
        raise HTTPException(
            status_code=400, detail="the client disconnected before the end of the upload; resend the file"
        ) from None
    idempotency.locate(request, response, row)
    return row
