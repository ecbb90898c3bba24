"""``/jobs``: create train, predict and evaluate jobs (202 + ``Location``), read, list and cancel them.

A job row is committed first, then dispatched (Celery by task name, or the embedded local
worker); the row is the truth for status, stage, progress, ETA, metrics, error and results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embedseg_service.api import idempotency, label_zip, objects
from embedseg_service.api.auth import Principal, PrincipalDep, visible
from embedseg_service.api.deps import LimitQuery, OffsetQuery, SessionDep, SettingsDep, StorageDep
from embedseg_service.api.dispatch import Dispatcher, DispatchError, make_dispatcher
from embedseg_service.api.objects import ObjectSort
from embedseg_service.api.owned import JobBodyDep, JobDep
from embedseg_service.api.quotas import check_queue, check_storage
from embedseg_service.records import jobs, webhooks
from embedseg_service.records.callbacks import TargetRefused, resolve_target
from embedseg_service.records.orm import Job, JobKind, JobStatus, Model, Volume, VolumeKind
from embedseg_service.records.schemas import (
    EvaluateSpec,
    JobOut,
    ObjectOut,
    Page,
    PredictSpec,
    TrainSpec,
    check_train_size,
)
from embedseg_service.records.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

CREATED: dict[int | str, dict[str, Any]] = {
    202: {"description": "Job queued; `Location` is its URL", "headers": {"Location": {"schema": {"type": "string"}}}},
    404: {"description": "A referenced volume or model does not exist"},
    422: {
        "description": "Invalid spec, volumes of the wrong kind, dimensionality or shape, a callback_url "
        "the server refuses (internal address, or no EMBEDSEG_WEBHOOK_SECRET), or a queue it does not list"
    },
    503: {"description": "The job broker is unreachable (the job is marked failed)"},
}


def get_dispatcher(request: Request) -> Dispatcher:
    """The app's dispatcher: the embedded local worker when one runs, else one made from the settings."""
    state = request.app.state
    dispatcher = getattr(state, "dispatcher", None)
    if dispatcher is None:
        dispatcher = state.dispatcher = make_dispatcher(state.settings)
    return dispatcher


# --------------------------------------------------------------------------- checks


def _fetch(session: Session, ids: Sequence[str], field: str, principal: Principal) -> list[Volume]:
    """The volumes in order; 404 naming the field and the first id that is missing or not the caller's."""
    statement = visible(select(Volume).where(Volume.id.in_(list(ids))), Volume.owner, principal)
    rows = {row.id: row for row in session.scalars(statement).all()}
    for volume_id in ids:
        if volume_id not in rows:
            raise HTTPException(status_code=404, detail=f"{field}: Volume {volume_id} not found")
    return [rows[volume_id] for volume_id in ids]


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _require_kind(rows: Sequence[Volume], kind: VolumeKind, field: str) -> None:
    for row in rows:
        if row.kind != kind.value:
            if kind is VolumeKind.labels:
                raise _unprocessable(
                    f"{field}: volume {row.id} is an image, not a label image; upload masks with kind=labels"
                )
            raise _unprocessable(
                f"{field}: volume {row.id} is a label image; give intensity images here (uploaded with kind=image)"
            )


def _require_dims(rows: Sequence[Volume], dims: int, field: str, what: str) -> None:
    for row in rows:
        n = len(row.spatial_shape)
        if n != dims:
            raise _unprocessable(f"{field}: volume {row.id} is {n}D but {what} is {dims}D")


def _require_same_shape(images: Sequence[Volume], masks: Sequence[Volume], field: str, what: str) -> None:
    for image, mask in zip(images, masks):
        if image.spatial_shape != mask.spatial_shape:
            raise _unprocessable(
                f"{field}: {what} {mask.id} has shape {mask.spatial_shape} but volume {image.id} has "
                f"{image.spatial_shape}; give the mask of the same image, in the same order"
            )


def _check_train(session: Session, spec: TrainSpec, settings: Settings, principal: Principal) -> None:
    if spec.max_time_minutes is not None and spec.max_time_minutes > settings.max_job_minutes:
        raise _unprocessable(
            f"max_time_minutes: must be at most {settings.max_job_minutes:g} (EMBEDSEG_MAX_JOB_MINUTES)"
        )
    images = _fetch(session, spec.image_ids, "image_ids", principal)
    masks = _fetch(session, spec.mask_ids, "mask_ids", principal)
    val_images = _fetch(session, spec.val_image_ids or [], "val_image_ids", principal)
    val_masks = _fetch(session, spec.val_mask_ids or [], "val_mask_ids", principal)
    _require_kind(images, VolumeKind.image, "image_ids")
    _require_kind(val_images, VolumeKind.image, "val_image_ids")
    _require_kind(masks, VolumeKind.labels, "mask_ids")
    _require_kind(val_masks, VolumeKind.labels, "val_mask_ids")
    what = "dims"
    _require_dims(images, spec.dims, "image_ids", what)
    _require_dims(val_images, spec.dims, "val_image_ids", what)
    _require_same_shape(images, masks, "mask_ids", "mask")
    _require_same_shape(val_images, val_masks, "val_mask_ids", "mask")
    try:
        check_train_size(spec, [row.spatial_shape for row in images], max_batch_voxels=settings.max_batch_voxels)
    except ValueError as error:
        raise _unprocessable(str(error)) from None
    channels = {row.n_channels for row in images + val_images}
    if len(channels) > 1:
        raise _unprocessable(
            f"image_ids: the images have different channel counts {sorted(channels)}; give images with one layout"
        )


def _check_predict(session: Session, spec: PredictSpec, principal: Principal) -> None:
    model = session.get(Model, spec.model_id)
    if model is None or not principal.can_see(model.owner):
        raise HTTPException(status_code=404, detail=f"model_id: Model {spec.model_id} not found")
    volumes = _fetch(session, spec.volume_ids, "volume_ids", principal)
    _require_kind(volumes, VolumeKind.image, "volume_ids")
    _require_dims(volumes, model.spatial_dims, "volume_ids", f"model {model.id}")
    in_channels = (model.config or {}).get("in_channels")
    if isinstance(in_channels, int):
        for row in volumes:
            if row.n_channels != in_channels:
                raise _unprocessable(
                    f"volume_ids: volume {row.id} has {row.n_channels} channel(s) but model {model.id} "
                    f"expects {in_channels}"
                )
    if isinstance(spec.tile, list) and len(spec.tile) != model.spatial_dims:
        raise _unprocessable(
            f"tile: give {model.spatial_dims} sizes for the {model.spatial_dims}D model, got {len(spec.tile)}"
        )
    if spec.gt_ids:
        gts = _fetch(session, spec.gt_ids, "gt_ids", principal)
        _require_kind(gts, VolumeKind.labels, "gt_ids")
        _require_same_shape(volumes, gts, "gt_ids", "ground truth")


def _check_evaluate(session: Session, spec: EvaluateSpec, principal: Principal) -> None:
    gts = _fetch(session, [pair.gt_id for pair in spec.pairs], "pairs.gt_id", principal)
    preds = _fetch(session, [pair.pred_id for pair in spec.pairs], "pairs.pred_id", principal)
    _require_kind(gts, VolumeKind.labels, "pairs.gt_id")
    _require_kind(preds, VolumeKind.labels, "pairs.pred_id")
    for index, (gt, pred) in enumerate(zip(gts, preds)):
        if gt.spatial_shape != pred.spatial_shape:
            raise _unprocessable(
                f"pairs.{index}: ground truth {gt.id} has shape {gt.spatial_shape} but prediction {pred.id} "
                f"has {pred.spatial_shape}"
            )
    if spec.thresholds is None and len({len(gt.spatial_shape) for gt in gts}) > 1:
        raise _unprocessable(
            "thresholds: the pairs mix 2D and 3D volumes, whose default IoU thresholds differ; "
            "give thresholds, or evaluate them in separate jobs"
        )


def _check_callback(spec: TrainSpec | PredictSpec | EvaluateSpec, settings: Settings) -> None:
    """422 unless the server can sign deliveries and every address of the callback URL's host may be reached."""
    if spec.callback_url is None:
        return
    if settings.webhook_secret is None:
        raise _unprocessable(
            "callback_url: this server has no webhook secret to sign deliveries with (EMBEDSEG_WEBHOOK_SECRET "
            "is unset); ask its operator to set one, or leave callback_url out"
        )
    try:
        resolve_target(spec.callback_url, settings.webhook_allowed_networks)
    except TargetRefused as error:
        raise _unprocessable(f"callback_url: {error}") from None


def _job_queue(spec: TrainSpec | PredictSpec | EvaluateSpec, settings: Settings) -> str:
    """The broker queue of the job: its spec's, which must be one the server lists (422 otherwise), or the default."""
    if spec.queue is None:
        return settings.gpu_queue
    if spec.queue not in settings.job_queues:
        listed = ", ".join(repr(queue) for queue in settings.job_queues)
        raise _unprocessable(
            f"queue: {spec.queue!r} is not a queue of this server; use one of {listed} (EMBEDSEG_QUEUES)"
        )
    return spec.queue


# --------------------------------------------------------------------------- create


@dataclass
class Submission:
    """What a job-creating route needs of its request (one dependency: :data:`SubmissionDep`)."""

    request: Request
    response: Response
    session: Session
    settings: Settings
    principal: Principal


def get_submission(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Submission:
    return Submission(request, response, session, settings, principal)


SubmissionDep = Annotated[Submission, Depends(get_submission)]


def _submit(
    sub: Submission, kind: JobKind, spec: TrainSpec | PredictSpec | EvaluateSpec, check: Callable[[], None]
) -> JobOut:
    """Check (``check``, quotas), insert and dispatch the job, or replay the job an ``Idempotency-Key`` made."""
    request, session, settings, principal = sub.request, sub.session, sub.settings, sub.principal
    key = idempotency.request_key(request)
    held = None
    if key is not None:
        digest = idempotency.fingerprint(f"POST /jobs/{kind.value}", spec.model_dump_json())
        held_or_id = idempotency.claim(session, principal, key, f"POST /jobs/{kind.value}", digest)
        if isinstance(held_or_id, str):
            return JobOut.model_validate(idempotency.replay(request, sub.response, session, Job, held_or_id, key))
        held = held_or_id
    with idempotency.holding(session, held):
        _check_callback(spec, settings)
        queue = _job_queue(spec, settings)
        check()
        check_queue(session, settings, principal)
        check_storage(session, settings, principal)
        job = jobs.create_job(
            session,
            kind,
            spec.model_dump(mode="json"),
            owner=principal.owner,
            volumes=spec.volume_roles(),
            model_id=spec.model_id if isinstance(spec, PredictSpec) else None,
            queue=queue,
        )
    if held is not None:
        idempotency.settle(session, held, job.id)
    try:
        get_dispatcher(request).submit(job.id, queue)
    except DispatchError as error:
        log.error("job %s not dispatched: %s", job.id, error)
        jobs.finish_job(session, job.id, JobStatus.failed, error=f"could not be queued: {error}")
        webhooks.deliver_soon(job.id, settings, request.app.state.sessionmaker, job.spec)
        raise HTTPException(
            status_code=503,
            detail=f"Job {job.id} could not be queued: the job broker is unreachable; check "
            "EMBEDSEG_BROKER_URL and that Redis is running, then resubmit",
        ) from None
    idempotency.locate(request, sub.response, job)
    return JobOut.model_validate(jobs.get_job(session, job.id))


@router.post("/train", status_code=202, response_model=JobOut, responses=CREATED, summary="Train a model")
def create_train_job(spec: TrainSpec, sub: SubmissionDep) -> JobOut:
    """Image and mask volume ids (paired by position), optional validation volumes or fraction, and options."""
    return _submit(sub, JobKind.train, spec, lambda: _check_train(sub.session, spec, sub.settings, sub.principal))


@router.post("/predict", status_code=202, response_model=JobOut, responses=CREATED, summary="Segment volumes")
def create_predict_job(spec: PredictSpec, sub: SubmissionDep) -> JobOut:
    """A model id, one or many image volume ids, TTA on/off, tile ``"auto"`` or sizes, optional GT ids for AP."""
    return _submit(sub, JobKind.predict, spec, lambda: _check_predict(sub.session, spec, sub.principal))


@router.post("/evaluate", status_code=202, response_model=JobOut, responses=CREATED, summary="Score predictions")
def create_evaluate_job(spec: EvaluateSpec, sub: SubmissionDep) -> JobOut:
    """Pairs of ground-truth and predicted label volume ids; the job's metrics hold the AP table."""
    return _submit(sub, JobKind.evaluate, spec, lambda: _check_evaluate(sub.session, spec, sub.principal))


# --------------------------------------------------------------------------- read


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    limit: LimitQuery = 50,
    offset: OffsetQuery = 0,
) -> Page[JobOut]:
    if limit > settings.page_limit_max:
        raise HTTPException(status_code=422, detail=f"query.limit: must be at most {settings.page_limit_max}")
    where = []
    if status is not None:
        where.append(Job.status == status.value)
    if kind is not None:
        where.append(Job.kind == kind.value)
    total = session.scalar(visible(select(func.count()).select_from(Job).where(*where), Job.owner, principal)) or 0
    rows = session.scalars(
        visible(select(Job).where(*where), Job.owner, principal)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return Page[JobOut](items=[JobOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}", response_model=JobOut, summary="One job: status, progress, metrics, results", responses={404: {}}
)
async def get_job(body: JobBodyDep) -> Response:
    # Polled by clients while a job runs: the body comes from the app's JobBodies, already serialised.
    return Response(body, media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job (queued: at once; running: at the next epoch or tile)",
    responses={404: {}, 409: {"description": "The job has already finished"}},
)
def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep, request: Request) -> JobOut:
    try:
        updated = jobs.request_cancel(session, job.id)
    except jobs.InvalidTransition as error:
        raise HTTPException(
            status_code=409,
            detail=f"Job {job.id} has already finished ({error.current}); only queued or running jobs can be cancelled",
        ) from None
    if updated.status == JobStatus.cancelled.value:  # a queued job: cancelled here, so its webhook goes from here
        webhooks.deliver_soon(job.id, settings, request.app.state.sessionmaker, updated.spec)
    return JobOut.model_validate(updated)


@router.get(
    "/{job_id}/labels.zip",
    response_class=Response,
    summary="A ZIP of every label volume of a succeeded predict job",
    responses={
        200: {"description": "One label TIFF per input image, named after it", "content": {"application/zip": {}}},
        404: {},
        409: {"description": "Not a predict job, not succeeded, or one of its label volumes was deleted"},
    },
)
def download_job_labels(job: JobDep, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    """Each entry is ``<image name>.tif`` (``-2``, ``-3``... on a clash), in the order of the job's volumes."""
    try:
        entries = label_zip.job_labels(session, job)
    except label_zip.LabelsUnavailable as error:
        raise HTTPException(status_code=409, detail=error.detail) from None
    archive = label_zip.build_zip(storage, entries)
    size = archive.seek(0, 2)
    archive.seek(0)
    headers = {
        "Content-Disposition": f'attachment; filename="{job.id[:8]}-labels.zip"',
        "Content-Length": str(size),
    }
    return StreamingResponse(label_zip.iter_file(archive), media_type="application/zip", headers=headers)


OBJECTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such job (or another owner's)"},
    409: {"description": "Not a predict job, not succeeded, or run before object tables were recorded"},
}


@router.get(
    "/{job_id}/objects",
    response_model=Page[ObjectOut],
    summary="The objects of a succeeded predict job's label volumes: size, centroid, bounding box, GT match",
    responses={**OBJECTS_RESPONSES, 422: {"description": "A volume_id that is not one of the job's, or a bad page"}},
)
def list_job_objects(
    job: JobDep,
    settings: SettingsDep,
    storage: StorageDep,
    volume_id: Annotated[str | None, Query(max_length=64, description="An input or label volume of the job")] = None,
    sort: Annotated[ObjectSort, Query(description="Column the rows of each volume are sorted by")] = ObjectSort.label,
    descending: bool = False,
    limit: LimitQuery = 100,
    offset: OffsetQuery = 0,
) -> Page[ObjectOut]:
    """One row per object, volume after volume in the job's order (``volume_id``: one volume's only).
    ``gt_label``/``iou`` come with the ground truth given in ``gt_ids``."""
    if limit > settings.page_limit_max:
        raise HTTPException(status_code=422, detail=f"query.limit: must be at most {settings.page_limit_max}")
    try:
        entries = objects.select_volume(job, objects.job_tables(job), volume_id)
        return objects.object_page(storage, job, entries, sort=sort, descending=descending, limit=limit, offset=offset)
    except objects.ObjectsUnavailable as error:
        raise HTTPException(status_code=error.status, detail=error.detail) from None


@router.get(
    "/{job_id}/objects.csv",
    response_class=Response,
    summary="The objects of every label volume of a succeeded predict job as CSV",
    responses={
        200: {"description": "A header row, then one row per object (a volume column)", "content": {"text/csv": {}}},
        **OBJECTS_RESPONSES,
    },
)
def download_job_objects(job: JobDep, storage: StorageDep) -> StreamingResponse:
    """Columns: volume_id, labels_id, label, voxel_count, centroid_<axis>, centroid_<axis>_physical (empty
    without a voxel size), bbox_min_<axis>, bbox_max_<axis>, gt_volume_id, gt_label, iou (empty without GT)."""
    try:
        entries = objects.job_tables(job)
        objects.check_files(storage, job, entries)
    except objects.ObjectsUnavailable as error:
        raise HTTPException(status_code=error.status, detail=error.detail) from None
    headers = {"Content-Disposition": f'attachment; filename="{job.id[:8]}-objects.csv"'}
    return StreamingResponse(
        objects.csv_lines(storage, job, entries), media_type="text/csv; charset=utf-8", headers=headers
    )
