"""``/volumes``: streamed TIFF upload, list, get, download, delete and PNG preview."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embedseg_service.api.auth import Principal, PrincipalDep, visible
from embedseg_service.api.deps import LimitQuery, OffsetQuery, SessionDep, SettingsDep, StorageDep
from embedseg_service.api.downloads import stored_file_response
from embedseg_service.api.owned import VolumeDep
from embedseg_service.api.preview import Plane, Projection, render_preview, render_section
from embedseg_service.api.tiff_checks import check_upload_values, inspect_upload, rewrite_upload
from embedseg_service.api.upload_route import UploaderDep
from embedseg_service.api.uploads import UPLOAD_RESPONSES, UploadRejected
from embedseg_service.api.zarr_checks import inspect_zarr_upload
from embedseg_service.core.data.io import TiffInfo, inspect_tiff
from embedseg_service.core.data.ome_zarr import OME_ZARR_ZIP_SUFFIX, OmeZarrInfo
from embedseg_service.core.data.zip_checks import is_zip
from embedseg_service.records.orm import Volume, VolumeFormat, VolumeKind, new_id
from embedseg_service.records.removal import delete_unless_in_use
from embedseg_service.records.schemas import Page, VolumeOut, parse_voxel_size
from embedseg_service.records.storage import Storage, volume_key, volume_zarr_key

router = APIRouter(prefix="/volumes", tags=["volumes"])

IMAGE_DTYPES = ("uint8", "uint16", "float32")
FORM_FIELDS = ("name", "kind", "axes", "voxel_size", "image_id")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_magic(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(4)


def _check_pixel_type(kind: str, info: TiffInfo | OmeZarrInfo) -> str:
    """The pixel type's name; :class:`UploadRejected` when ``kind`` does not allow it or the axes."""
    dtype = np.dtype(info.dtype).name
    if kind == VolumeKind.image.value and dtype not in IMAGE_DTYPES:
        raise UploadRejected(
            422,
            f"pixel type {dtype} is not supported for images; use uint8, uint16 or float32 "
            "(or send kind=labels for a label image)",
        )
    if kind == VolumeKind.labels.value:
        if not np.issubdtype(np.dtype(info.dtype), np.integer):
            raise UploadRejected(422, f"a label image must hold integers (0 = background), got {dtype}")
        if "C" in info.axes:
            raise UploadRejected(422, f"a label image has no channel axis, got axes {info.axes}")
    return dtype


def _check_fields(fields: dict[str, str]) -> tuple[str, str | None, list[float] | None, str | None, str | None]:
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise UploadRejected(422, f"unknown form field '{unknown[0]}'; use file, {', '.join(FORM_FIELDS)}")
    kind = fields.get("kind", "").strip() or VolumeKind.image.value
    if kind not in {k.value for k in VolumeKind}:
        raise UploadRejected(422, f"kind '{kind}' is not valid; use image or labels")
    axes = fields.get("axes", "").strip().upper() or None
    try:
        voxel_size = parse_voxel_size(fields.get("voxel_size"))
    except ValueError as error:
        raise UploadRejected(422, str(error)) from None
    name = fields.get("name", "").strip() or None
    if name is not None and len(name) > 255:
        raise UploadRejected(422, "name is longer than 255 characters")
    if name is not None and (set(name) & {"/", "\\"} or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)):
        raise UploadRejected(422, "name must not contain '/', '\\' or control characters; send a plain name")
    image_id = fields.get("image_id", "").strip() or None
    return kind, axes, voxel_size, name, image_id


def _default_name(filename: str | None) -> str:
    if not filename:
        return "volume"
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (OME_ZARR_ZIP_SUFFIX, ".ome.zarr", ".zip", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return (base or "volume")[:255]


def _validate_and_store(
    session: Session,
    storage: Storage,
    volume_id: str,
    received,  # type: ignore[no-untyped-def]
    fields: dict[str, str],
    principal: Principal,
) -> Volume:
    """Check the received file (form fields; TIFF header, voxel budget and pixel data layout; pixel type;
    pixel values, decoded a strip at a time), commit it and insert the row."""
    pending = received.pending
    try:
        kind, axes, voxel_size, name, image_id = _check_fields(fields)
        info, zarr = _inspect(pending.temp_path, pending.size, kind, axes, received.max_voxels)
        dtype = _check_pixel_type(kind, info)
        spatial_dims = info.spatial_dims
        if voxel_size is not None and len(voxel_size) != spatial_dims:
            raise UploadRejected(
                422,
                f"voxel_size has {len(voxel_size)} values but the volume has {spatial_dims} spatial axes "
                f"({info.axes.replace('C', '')})",
            )
        voxel = voxel_size if voxel_size is not None else (list(info.voxel_size) if info.voxel_size else None)
        spatial_shape = list(info.spatial_shape)
        if image_id is not None:
            if kind != VolumeKind.labels.value:
                raise UploadRejected(422, "image_id links a label image to its image; send it with kind=labels")
            image = session.get(Volume, image_id)
            if image is None or not principal.can_see(image.owner):
                raise UploadRejected(422, f"image_id: Volume {image_id} not found")
            if image.spatial_shape != spatial_shape:
                raise UploadRejected(
                    422, f"image_id: the labels' shape {spatial_shape} differs from the image's {image.spatial_shape}"
                )
        key = volume_zarr_key(volume_id) if zarr else volume_key(volume_id)
        if zarr:  # received under the TIFF key: stored under the store's own
            stored = storage.put(key, _chunks(pending.temp_path))
            pending.abort()
            sha256, size_bytes = stored.sha256, stored.size
        elif axes is not None and _needs_rewrite(pending.temp_path, info):
            # the file's own metadata would read back differently: store it in canonical order
            rewritten = pending.temp_path.with_suffix(".canonical.tif")
            try:
                rewrite_upload(
                    pending.temp_path, rewritten, axes=axes, voxel_size=voxel, max_voxels=received.max_voxels
                )
                pending.abort()
                stored = storage.put(key, _chunks(rewritten))
            finally:
                rewritten.unlink(missing_ok=True)
            sha256, size_bytes = stored.sha256, stored.size
        else:
            pending.commit()
            sha256, size_bytes = pending.sha256, pending.size
    except BaseException:
        pending.abort()
        raise
    row = Volume(
        id=volume_id,
        owner=principal.owner,
        name=name or _default_name(received.filename),
        kind=kind,
        sha256=sha256,
        shape=[int(n) for n in info.shape],
        dtype=dtype,
        axes=info.axes,
        voxel_size=voxel,
        size_bytes=size_bytes,
        storage_key=key,
        image_volume_id=image_id,
    )
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    return row


def _inspect(path: Path, size: int, kind: str, axes: str | None, max_voxels: int | None) -> tuple[Any, bool]:
    """(layout, whether it is a zipped OME-Zarr store) of the received file after the checks of its kind: a TIFF
    (header, voxel budget, pixel data layout, pixel type, values a strip at a time) or a zipped OME-Zarr store
    (:mod:`embedseg_service.api.zarr_checks`, a chunk at a time)."""
    if size == 0:
        raise UploadRejected(415, "the uploaded file is empty; send a TIFF file or a zipped OME-Zarr store")
    magic = _read_magic(path)
    labels = kind == VolumeKind.labels.value
    if is_zip(magic):
        if axes is not None:
            raise UploadRejected(422, "axes applies to TIFF files; an OME-Zarr store names its axes in its metadata")
        check = functools.partial(_check_pixel_type, kind)
        return inspect_zarr_upload(path, max_voxels=max_voxels, labels=labels, check_info=check), True
    if magic not in TIFF_MAGIC:
        raise UploadRejected(
            415,
            "the uploaded file is neither a TIFF (no TIFF header) nor a ZIP archive; send a .tif/.tiff file or a "
            "zipped OME-Zarr store (.ome.zarr.zip)",
        )
    info = inspect_upload(path, axes=axes, max_voxels=max_voxels)
    _check_pixel_type(kind, info)
    check_upload_values(path, axes=axes, labels=labels)
    return info, False


def _needs_rewrite(path: Path, info) -> bool:  # type: ignore[no-untyped-def]
    try:
        plain = inspect_tiff(path)
    except ValueError:
        return True
    return plain.axes != info.axes or tuple(plain.shape) != tuple(info.shape)


def _chunks(path: Path, size: int = 1024 * 1024):  # type: ignore[no-untyped-def]
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


@router.post(
    "",
    status_code=201,
    response_model=VolumeOut,
    summary="Upload a TIFF or a zipped OME-Zarr store (multipart form field `file`)",
    description=(
        "Multipart form with the TIFF in `file` (2D/3D, uint8/uint16/float32 images, integer label images, "
        "optional channel axis first), or a ZIP of an OME-Zarr image (recognised by its content; level 0 of its "
        "first multiscale image, axes and voxel size from its metadata, checked a chunk at a time; large volumes "
        "are predicted in streamed windows) and optional fields `name`, `kind` (image|labels), `axes` (the stored "
        "array's axes, e.g. ZYX or CZYX, overriding the file's metadata), `voxel_size` ('z,y,x' or 'y,x') and "
        "`image_id` (for labels: the image they belong to). The body is streamed to storage."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "The TIFF, or a zipped OME-Zarr store",
                            },
                            "name": {"type": "string", "description": "Default: the file name without .tif"},
                            "kind": {"type": "string", "enum": ["image", "labels"], "default": "image"},
                            "axes": {"type": "string", "description": "Stored array's axes, e.g. ZYX, CZYX"},
                            "voxel_size": {"type": "string", "description": "'z,y,x' or 'y,x' (array order)"},
                            "image_id": {"type": "string", "description": "For labels: the image they belong to"},
                        },
                    }
                }
            },
        }
    },
    responses={
        **UPLOAD_RESPONSES,
        415: {"description": "Not multipart, not a TIFF or ZIP, or a ZIP without an OME-Zarr image"},
        422: {"description": "Unsupported layout, pixel type or form field"},
    },
)
async def upload_volume(up: UploaderDep) -> VolumeOut:
    volume_id = new_id()
    row = await up.store(
        cls=Volume,
        storage_key=volume_key(volume_id),
        fields=FORM_FIELDS,
        max_voxels=up.settings.max_voxels,
        store=lambda received: _validate_and_store(
            up.session, up.storage, volume_id, received, received.fields, up.principal
        ),
    )
    return VolumeOut.model_validate(row)


@router.get("", response_model=Page[VolumeOut], summary="List volumes, newest first")
def list_volumes(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    limit: LimitQuery = 50,
    offset: OffsetQuery = 0,
    kind: VolumeKind | None = None,
) -> Page[VolumeOut]:
    if limit > settings.page_limit_max:
        raise HTTPException(status_code=422, detail=f"query.limit: must be at most {settings.page_limit_max}")
    where = [] if kind is None else [Volume.kind == kind.value]
    counted = visible(select(func.count()).select_from(Volume).where(*where), Volume.owner, principal)
    total = session.scalar(counted) or 0
    rows = session.scalars(
        visible(select(Volume).where(*where), Volume.owner, principal)
        .order_by(Volume.created_at.desc(), Volume.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return Page[VolumeOut](items=[VolumeOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{volume_id}", response_model=VolumeOut, summary="One volume", responses={404: {}})
def get_volume(volume: VolumeDep) -> VolumeOut:
    return VolumeOut.model_validate(volume)


@router.get(
    "/{volume_id}/download",
    response_class=FileResponse,
    summary="The stored file: the TIFF, or the zipped OME-Zarr store",
    responses={200: {"content": {"image/tiff": {}, "application/zip": {}}}, 404: {}},
)
def download_volume(volume: VolumeDep, storage: StorageDep) -> Response:
    if volume.format == VolumeFormat.ome_zarr.value:
        return stored_file_response(storage, volume.storage_key, media_type="application/zip",
                                    filename=f"{volume.name}{OME_ZARR_ZIP_SUFFIX}")  # fmt: skip
    return stored_file_response(storage, volume.storage_key, media_type="image/tiff", filename=f"{volume.name}.tif")


@router.delete(
    "/{volume_id}",
    status_code=204,
    summary="Delete a volume not used by a queued or running job",
    responses={404: {}, 409: {"description": "Used by a queued or running job"}},
)
def delete_volume(volume: VolumeDep, session: SessionDep, storage: StorageDep) -> Response:
    delete_unless_in_use(session, storage, volume)
    return Response(status_code=204)


def _latest_prediction(session: Session, volume: Volume) -> Volume | None:
    return session.scalars(
        select(Volume)
        .where(
            Volume.image_volume_id == volume.id,
            Volume.kind == VolumeKind.labels.value,
            Volume.owner.is_not_distinct_from(volume.owner),
        )
        .order_by(Volume.created_at.desc(), Volume.id)
        .limit(1)
    ).first()


def _check_plane(plane: Plane, projection: Projection, z: int | None, y: int | None, x: int | None) -> None:
    """422 for options that do not go together: each of z, y, x selects one kind of plane."""
    if z is not None and projection is Projection.max:
        raise HTTPException(status_code=422, detail="z selects a slice; leave it out with projection=max")
    if plane is not Plane.xy and projection is Projection.max:
        raise HTTPException(status_code=422, detail="projection=max applies to plane=xy; leave it out with xz or yz")
    if plane is not Plane.xy and z is not None:
        raise HTTPException(
            status_code=422, detail="z selects the XY plane; with plane=xz give y, with plane=yz give x"
        )
    if y is not None and plane is not Plane.xz:
        raise HTTPException(status_code=422, detail="y selects the XZ plane; give it with plane=xz")
    if x is not None and plane is not Plane.yz:
        raise HTTPException(status_code=422, detail="x selects the YZ plane; give it with plane=yz")


def _preview_paths(
    session: Session, storage: Storage, volume: Volume, overlay: bool
) -> tuple[Path | None, Path | None]:
    """(image, labels) to draw for ``volume``: a label volume over its image, an image under its latest labels."""
    image_path = labels_path = None
    if volume.kind == VolumeKind.labels.value:
        labels_path = storage.path_for(volume.storage_key)
        if overlay and volume.image_volume_id:
            image = session.get(Volume, volume.image_volume_id)
            if image is not None and image.owner == volume.owner and storage.exists(image.storage_key):
                image_path = storage.path_for(image.storage_key)
    else:
        image_path = storage.path_for(volume.storage_key)
        prediction = _latest_prediction(session, volume) if overlay else None
        if prediction is not None and storage.exists(prediction.storage_key):
            labels_path = storage.path_for(prediction.storage_key)
    return image_path, labels_path


@router.get(
    "/{volume_id}/preview.png",
    response_class=Response,
    summary="PNG of a slice, the max projection or an XZ/YZ plane, labels as a coloured overlay",
    description=(
        "`plane=xy` (default): the middle Z slice (or `z`), or with `projection=max` the maximum projection. "
        "`plane=xz` / `plane=yz` (3D): the plane through row `y` / column `x` (default the centre), rows "
        "along Z, scaled by the volume's voxel size so that anisotropic stacks keep their proportions. "
        "A label volume is drawn over its image; an image under its latest labels (`overlay=false`: not)."
    ),
    responses={200: {"content": {"image/png": {}}}, 404: {}, 422: {}},
)
def preview_volume(
    volume: VolumeDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    projection: Projection = Projection.middle,
    z: Annotated[int | None, Query(description="Slice to show (3D, plane=xy); default the middle one")] = None,
    channel: Annotated[int, Query(ge=0)] = 0,
    overlay: Annotated[bool, Query(description="Draw labels over the image when there are any")] = True,
    plane: Annotated[Plane, Query(description="xy, or through a 3D volume xz or yz")] = Plane.xy,
    y: Annotated[int | None, Query(description="Row of the XZ plane (plane=xz); default the centre")] = None,
    x: Annotated[int | None, Query(description="Column of the YZ plane (plane=yz); default the centre")] = None,
) -> Response:
    _check_plane(plane, projection, z, y, x)
    image_path, labels_path = _preview_paths(session, storage, volume, overlay)
    try:
        if plane is Plane.xy:
            png = render_preview(
                image_path,
                labels_path=labels_path,
                projection=projection,
                z=z,
                channel=channel,
                max_px=settings.preview_max_px,
                max_voxels=settings.max_voxels,
            )
        else:
            png = render_section(
                image_path,
                labels_path=labels_path,
                plane=plane,
                index=y if plane is Plane.xz else x,
                channel=channel,
                voxel_size=volume.voxel_size,
                max_px=settings.preview_max_px,
                max_voxels=settings.max_voxels,
            )
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    return Response(content=png, media_type="image/png")
