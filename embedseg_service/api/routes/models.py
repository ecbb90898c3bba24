"""``/models``: trained models: list, get, download the checkpoint, export the network, upload one, delete."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from python_multipart.multipart import parse_options_header
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embedseg_service.api.auth import Principal, PrincipalDep, visible
from embedseg_service.api.checkpoints import CheckpointInvalid, read_checkpoint_summary
from embedseg_service.api.deps import LimitQuery, OffsetQuery, SessionDep, SettingsDep, StorageDep
from embedseg_service.api.downloads import stored_file_response
from embedseg_service.api.exports import exported_network
from embedseg_service.api.owned import ModelDep
from embedseg_service.api.upload_route import UploaderDep
from embedseg_service.api.uploads import UPLOAD_RESPONSES, ReceivedUpload
from embedseg_service.core.model.export_format import INPUT_CONTRACT, ExportFormat
from embedseg_service.records.orm import Model, new_id, utcnow
from embedseg_service.records.removal import delete_unless_in_use
from embedseg_service.records.schemas import ModelOut, Page
from embedseg_service.records.storage import Storage, model_exports_prefix, model_key

router = APIRouter(prefix="/models", tags=["models"])

FORM_FIELDS = ("name",)


def upload_provenance(sha256: str, filename: str | None, recorded: dict[str, Any]) -> dict[str, Any]:
    """The provenance of an uploaded model file: its sha256 and name, when it came, and what the file itself
    records (library versions, seed, device, epochs; absent from files that do not say)."""
    return {
        "origin": "uploaded",
        "sha256": sha256,
        "filename": filename,
        "uploaded_at": utcnow().isoformat(),
        "versions": recorded.get("versions"),
        "seed": recorded.get("seed"),
        "device": recorded.get("device"),
        "epoch": recorded.get("epoch"),
    }


def _download_name(name: str, suffix: str = ".pt") -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return f"{safe[:100]}{suffix}"


@router.get("", response_model=Page[ModelOut], summary="List models, newest first")
def list_models(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    spatial_dims: Annotated[int | None, Query(ge=2, le=3, description="Only 2D or 3D models")] = None,
    limit: LimitQuery = 50,
    offset: OffsetQuery = 0,
) -> Page[ModelOut]:
    if limit > settings.page_limit_max:
        raise HTTPException(status_code=422, detail=f"query.limit: must be at most {settings.page_limit_max}")
    where = [] if spatial_dims is None else [Model.spatial_dims == spatial_dims]
    total = session.scalar(visible(select(func.count()).select_from(Model).where(*where), Model.owner, principal)) or 0
    rows = session.scalars(
        visible(select(Model).where(*where), Model.owner, principal)
        .order_by(Model.created_at.desc(), Model.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return Page[ModelOut](items=[ModelOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{model_id}",
    response_model=ModelOut,
    summary="One model: config, data-derived parameters, metrics",
    responses={404: {}},
)
def get_model(model: ModelDep) -> ModelOut:
    return ModelOut.model_validate(model)


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    summary="The model's checkpoint file",
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {}},
)
def download_model(model: ModelDep, storage: StorageDep) -> Response:
    return stored_file_response(
        storage, model.storage_key, media_type="application/octet-stream", filename=_download_name(model.name)
    )


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    summary="The model's network as a TorchScript or ONNX file",
    description="A file that runs with torch alone (`torch.jit.load`) or with any ONNX runtime, named "
    "`<model name>.pt` or `<model name>.onnx`. It is made on the first request for the format (seconds) and "
    "kept, so later requests only send it.\n\n" + INPUT_CONTRACT,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The exported network"},
        404: {},
        413: {"description": "The model's owner has no room for the export (EMBEDSEG_QUOTA_STORED_BYTES)"},
        501: {"description": "The format cannot be written on this server (ONNX without the `onnx` package)"},
    },
)
def export_model(
    model: ModelDep,
    storage: StorageDep,
    session: SessionDep,
    settings: SettingsDep,
    fmt: Annotated[
        ExportFormat, Query(alias="format", description="`torchscript` (a `.pt` file) or `onnx` (a `.onnx` file)")
    ] = ExportFormat.torchscript,
) -> Response:
    key = exported_network(storage, session, settings, model, fmt)
    return stored_file_response(
        storage, key, media_type="application/octet-stream", filename=_download_name(model.name, fmt.suffix)
    )


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    summary="Upload a checkpoint (multipart form field `file`, optional `name`)",
    description="A model file written by this service (`embedseg train` or a training job). It is checked "
    "without running anything from it and can then be used by prediction jobs.",
    responses={
        **UPLOAD_RESPONSES,
        415: {"description": "Not multipart/form-data"},
        422: {"description": "Not a model file of this service, or a bad form field"},
    },
)
async def upload_model(up: UploaderDep) -> ModelOut:
    content_type, _ = parse_options_header(up.request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise HTTPException(
            status_code=415, detail="send the checkpoint as multipart/form-data with the file in the form field 'file'"
        )
    model_id = new_id()
    row = await up.store(
        cls=Model,
        storage_key=model_key(model_id),
        fields=FORM_FIELDS,
        store=lambda received: _store_model(up.session, up.storage, up.principal, received, model_id),
    )
    return ModelOut.model_validate(row)


def _store_model(
    session: Session, storage: Storage, principal: Principal, received: ReceivedUpload, model_id: str
) -> Model:
    """Check the received checkpoint and form fields, commit the file and insert the model's row."""
    pending = received.pending
    try:
        unknown = sorted(set(received.fields) - set(FORM_FIELDS))
        if unknown:
            raise HTTPException(status_code=422, detail=f"unknown form field '{unknown[0]}'; use file, name")
        name = received.fields.get("name", "").strip()
        if len(name) > 255:
            raise HTTPException(status_code=422, detail="name is longer than 255 characters")
        if pending.size == 0:
            raise HTTPException(status_code=422, detail="the uploaded file is empty; send a model file (.pt)")
        pending.close()
        try:
            summary = read_checkpoint_summary(pending.temp_path)
        except CheckpointInvalid as error:
            raise HTTPException(status_code=422, detail=f"not a usable model file: {error}") from None
        pending.commit()
    except BaseException:
        pending.abort()
        raise
    base = (received.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"\.(pt|pth)$", "", base, flags=re.IGNORECASE)
    config = dict(summary.config)
    config.setdefault("spatial_dims", summary.spatial_dims)
    config.setdefault("in_channels", summary.in_channels)
    row = Model(
        id=model_id,
        owner=principal.owner,
        name=(name or base or "uploaded model")[:255],
        spatial_dims=summary.spatial_dims,
        config=config,
        data_properties=summary.properties or None,
        metrics=summary.metrics or None,
        storage_key=pending.key,
        size_bytes=pending.size,
        provenance=upload_provenance(pending.sha256, received.filename, summary.recorded),
    )
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(pending.key)
        raise
    return row


@router.delete(
    "/{model_id}",
    status_code=204,
    summary="Delete a model not used by a queued or running job",
    responses={404: {}, 409: {"description": "Used by a queued or running job"}},
)
def delete_model(model: ModelDep, session: SessionDep, storage: StorageDep) -> Response:
    exports = model_exports_prefix(model.id)
    delete_unless_in_use(session, storage, model)
    storage.delete_prefix(exports)
    return Response(status_code=204)
