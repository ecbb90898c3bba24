"""The job handlers: train, predict and evaluate, each ``handler(context) -> JobOutcome``.

Handlers read their input volumes from storage, run :mod:`core`, write their outputs under the
attempt's storage folder (``jobs/<job id>/a<attempt>/...``, temp file + rename: a late or
duplicate run writes beside the winner's files, never over them) and return the new rows; the
runner registers them in the transaction that marks the job succeeded, if the claim is still
theirs. They report progress through ``context.reporter`` and stop with
:class:`embedseg_service.worker.progress.JobCancelled` when cancellation is requested.

A train job stores its resumable state (``last.pt``) in its attempt's folder after every epoch;
a later attempt of the job (after a worker stopped or was lost) resumes from the newest one.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedseg_service.records import object_tables
from embedseg_service.records.orm import JobKind, Model, Volume, VolumeFormat, VolumeKind, new_id
from embedseg_service.records.schemas import EvaluateSpec, PredictSpec, TrainSpec
from embedseg_service.records.storage import StorageError, checkpoint_key
from embedseg_service.worker import stream_predict
from embedseg_service.worker.context import Handler, JobContext, JobOutcome
from embedseg_service.worker.progress import JobCancelled, JobReporter
from embedseg_service.worker.provenance import training_provenance

if TYPE_CHECKING:
    from embedseg_service.core.training.config import TrainConfig
    from embedseg_service.core.training.train import TrainProgress, TrainResult

CHUNK = 1024 * 1024
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading and storing


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and numpy scalars as Python numbers (JSON columns)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def load_volume_rows(context: JobContext, ids: Sequence[str]) -> list[Volume]:
    """The volume rows for ``ids`` in order; ValueError naming a missing one."""
    with context.session() as session:
        rows = []
        for volume_id in ids:
            row = session.get(Volume, volume_id)
            if row is None:
                raise ValueError(f"volume {volume_id} no longer exists")
            rows.append(row)
        return rows


def read_volume(context: JobContext, row: Volume) -> np.ndarray:
    """The pixels of a stored volume (a TIFF, or a zipped OME-Zarr store read whole) in canonical axis order
    (``YX``, ``ZYX``, ``CYX`` or ``CZYX``)."""
    from embedseg_service.core.data.io import read_tiff
    from embedseg_service.core.data.ome_zarr import OmeZarrVolume

    path = context.storage.path_for(row.storage_key)
    if row.format == VolumeFormat.ome_zarr.value:
        with OmeZarrVolume(path) as volume:
            return volume.read()
    return read_tiff(path).data


def _store_file(context: JobContext, name: str, path: Path | bytes, *, check: bool = True) -> tuple[str, str, int]:
    """Store a local file (or bytes) under the attempt's key ``jobs/<job>/a<attempt>/<name>`` while the claim
    is still this worker's (``check=False``: the caller checked it just before); returns (key, sha256, size)."""
    if check:
        context.reporter.check_claim()
    key = context.output_key(name)
    written = context.storage.put(key, [path] if isinstance(path, bytes) else _chunks(path))
    return key, written.sha256, written.size


def _ap_summary(result: Any) -> dict[str, Any]:
    """Dataset AP (embedseg_service.core.metrics.DatasetResult) without the per-image list."""
    data = result.to_dict()
    data.pop("images", None)
    return json_safe(data)


def _image_ap(result: Any, **ids: str | None) -> dict[str, Any]:
    return json_safe(
        {
            **ids,
            "n_gt": result.n_gt,
            "n_pred": result.n_pred,
            "thresholds": result.thresholds,
            "ap": result.ap,
            "results": [r.to_dict() for r in result.results],
        }
    )


# --------------------------------------------------------------------------- warnings


def training_warnings(best_metrics: dict[str, Any], epochs_completed: int) -> list[str]:
    """What a user should know about a finished training: a saved model that finds no objects."""
    warnings = []
    if best_metrics.get("degenerate"):
        warnings.append(
            f"the saved model predicted no objects on the validation data after {epochs_completed} epoch(s) "
            "(its seed map never reached the seed threshold): train longer (more epochs or a larger "
            "max_time_minutes) and check that the masks label every object of the images"
        )
    return warnings


def prediction_warnings(model_metrics: dict[str, Any] | None, empty_volume_ids: Sequence[str]) -> list[str]:
    """Warnings of a predict job: a model known to find no objects, volumes where nothing was found."""
    warnings = []
    if (model_metrics or {}).get("best", {}).get("degenerate"):
        warnings.append(
            "the model predicted no objects on its validation data when it was trained; "
            "train it longer before trusting its labels"
        )
    if empty_volume_ids:
        warnings.append(
            f"no objects found in volume(s) {', '.join(empty_volume_ids)}: check that the images resemble the "
            "training data (modality, scale, intensity range) or train the model longer"
        )
    return warnings


# --------------------------------------------------------------------------- train


def _train_config(spec: TrainSpec, context: JobContext, image_rows: list[Volume], in_channels: int) -> TrainConfig:
    """The :class:`embedseg_service.core.training.config.TrainConfig` of a train spec, through
    :func:`embedseg_service.core.training.config.config_from_options` (as ``embedseg train``): without a voxel
    size in the spec, the first image's that states one for the spec's dimensions; the time limit capped
    by the settings."""
    from embedseg_service.core.training.config import config_from_options

    max_minutes = spec.max_time_minutes or context.settings.max_job_minutes
    options = spec.training_options()
    options.update(max_time_minutes=min(max_minutes, context.settings.max_job_minutes), in_channels=in_channels)
    data_voxel_size = next((row.voxel_size for row in image_rows if row.voxel_size), None)
    return config_from_options(options, data_voxel_size=data_voxel_size)


def _train_progress(context: JobContext, last_path: Path, resumed_from: int | None) -> Callable[[TrainProgress], bool]:
    """A training progress callback that reports the stage, the fraction done and one record per epoch,
    and stores the resumable state written at each epoch's end (``last_path``) under the attempt's key."""
    reporter = context.reporter
    epochs: list[dict[str, Any]] = []
    extra = {} if resumed_from is None else {"resumed_from_epoch": resumed_from}

    def on_progress(info: TrainProgress) -> bool:
        epoch_end = info.step == 0 and info.epoch >= 1 and (not epochs or epochs[-1]["epoch"] < info.epoch)
        if epoch_end:
            epochs.append(
                json_safe(
                    {
                        "epoch": info.epoch,
                        "loss": info.loss,
                        "val_iou": info.val_iou,
                        "val_ap": info.val_ap,
                        "val_map": info.val_map,
                    }
                )
            )
        if epoch_end and context.attempt is not None and last_path.is_file():
            reporter.check_claim()  # stored before a stop request is acted on, so the epoch is kept
            context.storage.put_file(checkpoint_key(context.job_id, context.attempt), last_path)
        return bool(
            reporter.update(
                progress=0.97 * info.fraction,
                stage=f"training epoch {min(info.epoch + (0 if info.step == 0 else 1), info.epochs)}/{info.epochs}",
                eta_s=info.eta_s,
                metrics={"epochs": epochs, "epochs_total": info.epochs, **extra},
                force=epoch_end,
            )
        )

    return on_progress


def resume_point(context: JobContext, config: TrainConfig) -> tuple[Path, int] | None:
    """(local copy, epoch) of the newest resumable state an earlier attempt of the job stored, or None.

    Earlier attempts are tried newest first; a state that cannot be read or does not fit the
    configuration is skipped (the job then trains from the start).
    """
    from embedseg_service.core.model.checkpoint import load_checkpoint
    from embedseg_service.core.training.prepare import check_resume

    for attempt in range((context.attempt or 1) - 1, 0, -1):
        key = checkpoint_key(context.job_id, attempt)
        local = context.scratch / f"resume-a{attempt}.pt"
        try:
            if not context.storage.exists(key):
                continue
            with context.storage.open_read(key) as source, open(local, "wb") as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
            data = load_checkpoint(local)
            check_resume(data, config)
            return local, int(data.get("epoch", 0))
        except (StorageError, OSError, ValueError, KeyError, RuntimeError) as error:
            log.warning(
                "job %s: the state of attempt %d is not resumable (%s); trying an older one",
                context.job_id,
                attempt,
                error,
            )
            local.unlink(missing_ok=True)
    return None


def _train_metrics(spec: TrainSpec, result: TrainResult) -> tuple[dict[str, Any], Any]:
    """The job's final metrics (per-epoch records, best state, how training stopped, warnings) and the
    JSON-safe history of a :class:`embedseg_service.core.training.train.TrainResult`."""
    history = json_safe(result.history)
    metrics = {
        "epochs": [
            {key: record.get(key) for key in ("epoch", "loss", "val_loss", "val_iou", "val_ap", "val_map")}
            for record in history
        ],
        "epochs_total": spec.epochs,
        "epochs_completed": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "best": json_safe(result.best_metrics),
        "stopped": result.stopped,
        "elapsed_s": round(result.elapsed_s, 3),
    }
    warnings = training_warnings(result.best_metrics, result.epochs_completed)
    if warnings:
        metrics["warnings"] = warnings
    return metrics, history


def run_train(context: JobContext) -> JobOutcome:
    """Train a model on the spec's image/mask volumes; registers a model row with config, properties, metrics."""
    from embedseg_service.core.training.train import last_checkpoint_path, train

    spec = TrainSpec.model_validate(context.spec)
    reporter = context.reporter
    reporter.update(progress=0.0, stage="loading data", force=True)
    image_rows = load_volume_rows(context, spec.image_ids)
    mask_rows = load_volume_rows(context, spec.mask_ids)
    val_image_rows = load_volume_rows(context, spec.val_image_ids or [])
    val_mask_rows = load_volume_rows(context, spec.val_mask_ids or [])
    channels = {row.n_channels for row in image_rows + val_image_rows}
    if len(channels) != 1:
        raise ValueError(f"the images have different channel counts {sorted(channels)}; give images of one kind")
    images = [read_volume(context, row) for row in image_rows]
    masks = [read_volume(context, row) for row in mask_rows]
    val_images = [read_volume(context, row) for row in val_image_rows] or None
    val_masks = [read_volume(context, row) for row in val_mask_rows] or None
    reporter.raise_if_cancelled(poll=True)
    config = _train_config(spec, context, image_rows, channels.pop())

    resume = resume_point(context, config)
    resumed_from = None if resume is None else resume[1]
    reporter.update(stage="training" if resume is None else f"resuming at epoch {resumed_from}", force=True)
    model_file = context.scratch / "model.pt"
    result = train(
        images,
        masks,
        config,
        out_path=model_file,
        val_images=val_images,
        val_masks=val_masks,
        resume_from=None if resume is None else resume[0],
        progress=_train_progress(context, last_checkpoint_path(model_file), resumed_from),
    )
    metrics, history = _train_metrics(spec, result)
    if resumed_from is not None:
        metrics["resumed_from_epoch"] = resumed_from
    if result.stopped == "requested":
        cancelled = JobCancelled(context.job_id)
        cancelled.metrics = metrics  # type: ignore[attr-defined]
        raise cancelled

    reporter.update(progress=0.98, stage="saving model", force=True)
    key, _sha, size = _store_file(context, "model.pt", model_file)
    model = Model(
        id=new_id(),
        name=spec.name or f"model of job {context.job_id[:8]}",
        spatial_dims=spec.dims,
        config=json_safe(config.to_dict()),
        data_properties=json_safe(result.properties),
        metrics={
            "best_epoch": result.best_epoch,
            "best": metrics["best"],
            "epochs_completed": result.epochs_completed,
            "stopped": result.stopped,
            "elapsed_s": metrics["elapsed_s"],
            "history": history,
        },
        storage_key=key,
        size_bytes=size,
        provenance=training_provenance(
            context.job_id,
            config,
            {"images": image_rows, "masks": mask_rows, "val_images": val_image_rows, "val_masks": val_mask_rows},
        ),
    )
    return JobOutcome(result={"model_id": model.id}, metrics=metrics, outputs=[model])


# --------------------------------------------------------------------------- predict


def _store_object_table(
    context: JobContext, row: Volume, output: Volume, labels: np.ndarray, gt: np.ndarray | None, gt_id: str | None
) -> dict[str, Any]:
    """Write the per-object table of ``labels`` (matched to ``gt`` when given) under the attempt's folder;
    returns its entry of ``result["object_tables"]``."""
    import json

    from embedseg_service.core.metrics import OBJECT_MATCH_THRESHOLD, object_table

    rows = object_table(labels, gt, voxel_size=output.voxel_size)
    table = {
        "volume_id": row.id,
        "labels_id": output.id,
        "gt_id": gt_id,
        "axes": output.axes,
        "voxel_size": output.voxel_size,
        "match_threshold": OBJECT_MATCH_THRESHOLD if gt is not None else None,
        "objects": rows,
    }
    data = json.dumps(json_safe(table), separators=(",", ":")).encode("utf-8")
    _store_file(context, object_tables.table_name(row.id), data, check=False)  # right after the checked labels
    return {"volume_id": row.id, "labels_id": output.id, "gt_id": gt_id, "n_objects": len(rows)}


def _predict_model(context: JobContext, model_id: str) -> tuple[Any, dict[str, Any] | None]:
    """The job's model, kept loaded between the jobs of this process (:mod:`embedseg_service.worker.model_cache`),
    and its stored metrics; ValueError when its row is gone (deleted: its kept copy goes too)."""
    from embedseg_service.worker.model_cache import process_cache

    cache = process_cache(context.settings.model_cache_bytes)
    with context.session() as session:
        row = session.get(Model, model_id)
        if row is None:
            cache.discard(model_id)
            raise ValueError(f"model {model_id} no longer exists")
        metrics, key = row.metrics, row.storage_key
    return cache.get(model_id, context.storage.path_for(key)), metrics


def _predict_batches(context: JobContext, model: Any, rows: Sequence[Volume]) -> list[list[int]]:
    """Indices of ``rows`` in the batches whose images run through the network together: one shape and
    channel count each, bounded by the setting ``inference_batch_voxels`` (0: one image per batch)."""
    from embedseg_service.core.inference.predict import plan_batches

    budget = context.settings.inference_batch_voxels
    if budget == 0:
        return [[i] for i in range(len(rows))]
    return plan_batches([(row.n_channels, *row.spatial_shape) for row in rows], model.device, budget)


def _segment_rows(
    context: JobContext,
    model: Any,
    spec: PredictSpec,
    rows: Sequence[Volume],
    progress: Callable[[int, int], bool | None],
) -> list[np.ndarray]:
    """Labels of the stored volumes ``rows``, segmented together (:meth:`TrainedModel.segment_batch`)."""
    from embedseg_service.core.inference.tiling import PredictionCancelled

    images = [read_volume(context, row) for row in rows]
    tile: str | tuple[int, ...] = spec.tile if isinstance(spec.tile, str) else tuple(spec.tile)
    settings = context.settings
    try:
        return model.segment_batch(images, tta=spec.tta, tile=tile, progress=progress, min_size=spec.min_size,
                                   precision=settings.inference_precision,
                                   batch_voxels=settings.inference_batch_voxels or None)  # fmt: skip
    except PredictionCancelled:
        raise JobCancelled(context.job_id) from None


def _store_labels(context: JobContext, spec: PredictSpec, row: Volume, labels: np.ndarray) -> Volume:
    """Store the labels of the volume ``row``; returns their (unregistered) volume row."""
    from embedseg_service.core.data.tiff_write import label_dtype, write_labels

    voxel = row.voxel_size if row.voxel_size and len(row.voxel_size) == labels.ndim else None
    tiff = io.BytesIO()  # compressed labels: no larger than the labels held already
    write_labels(tiff, labels, voxel_size=voxel)
    key, sha256, size = _store_file(context, f"labels-{row.id}.tif", tiff.getvalue())
    max_id = int(labels.max()) if labels.size else 0
    return Volume(
        id=new_id(),
        name=context.labels_name(row.name, spec.tta),
        kind=VolumeKind.labels.value,
        sha256=sha256,
        shape=[int(s) for s in labels.shape],
        dtype=label_dtype(max_id).name,
        axes="YX" if labels.ndim == 2 else "ZYX",
        voxel_size=voxel,
        size_bytes=size,
        storage_key=key,
        image_volume_id=row.id,
    )


def _batch_progress(reporter: JobReporter, first: int, size: int, n: int) -> Callable[[int, int], bool | None]:
    """Record the stage of the batch of volumes ``first``.. (``size`` of ``n``; written when the reporter's
    throttle allows, as the progress of its tiles); returns the progress callback of its tiles
    (:func:`~embedseg_service.core.inference.predict.batch_progress` onto the job's first 95 %)."""
    from embedseg_service.core.inference.predict import batch_progress

    stage = f"predicting volume {first + 1}/{n}" if size == 1 else f"predicting volumes {first + 1}-{first + size}/{n}"
    reporter.update(progress=0.95 * first / n, stage=stage)

    def of_job(done: int, total: int) -> bool:
        return reporter.update(progress=0.95 * done / max(total, 1), stage=stage)

    return batch_progress(of_job, first, size, n)


def _volume_outputs(
    context: JobContext, spec: PredictSpec, row: Volume, gt_row: Volume | None, labels: np.ndarray
) -> stream_predict.Outputs:
    """Store the labels of ``row`` and their object table, score them against ``gt_row`` when given; returns
    (labels row, the volume's metrics entry, its object table entry, its AP result or None)."""
    from embedseg_service.core.metrics import average_precision

    output = _store_labels(context, spec, row, labels)
    entry: dict[str, Any] = {"volume_id": row.id, "labels_id": output.id,
                             "n_objects": int(np.unique(labels[labels > 0]).size)}  # fmt: skip
    gt, scored = None, None
    if gt_row is not None:
        stream_predict.check_ground_truth(row, gt_row)
        gt = read_volume(context, gt_row)
        scored = average_precision(gt, labels, name=row.id)
        entry.update(_image_ap(scored, gt_id=gt_row.id))
    table = _store_object_table(context, row, output, labels, gt, None if gt_row is None else gt_row.id)
    return output, entry, table, scored


def run_predict(context: JobContext) -> JobOutcome:
    """Segment each volume with the model; one labels volume and one per-object table per input, AP
    against GT when given. Volumes of one shape run through the network together (:func:`_predict_batches`)."""
    from embedseg_service.core.metrics import aggregate

    spec = PredictSpec.model_validate(context.spec)
    reporter = context.reporter
    reporter.update(progress=0.0, stage="loading model", force=True)
    model, model_metrics = _predict_model(context, spec.model_id)
    rows = load_volume_rows(context, spec.volume_ids)
    gt_rows = load_volume_rows(context, spec.gt_ids) if spec.gt_ids else [None] * len(rows)
    n = len(rows)
    streamed = [i for i, row in enumerate(rows) if stream_predict.streams(context.settings, row)]
    whole = [i for i in range(n) if i not in streamed]
    batches = [[whole[j] for j in b] for b in _predict_batches(context, model, [rows[i] for i in whole])]
    stored: dict[int, stream_predict.Outputs] = {}
    first = 0
    for batch in batches + [[i] for i in streamed]:
        on_tile = _batch_progress(reporter, first, len(batch), n)
        reporter.raise_if_cancelled()  # the flag as the last progress write or heartbeat read it
        first += len(batch)
        if batch[0] in streamed:  # larger than memory, or OME-Zarr: windows into OME-Zarr labels
            i, gt_row = batch[0], gt_rows[batch[0]]
            output, entry, table, scored = stream_predict.predict_streamed(context, model, spec, rows[i], gt_row,
                                                                           on_tile)  # fmt: skip
            if gt_row is not None:
                entry.update(_image_ap(scored, gt_id=gt_row.id))
            stored[i] = (output, entry, table, scored)
            continue
        labels = _segment_rows(context, model, spec, [rows[i] for i in batch], on_tile)
        for i, volume_labels in zip(batch, labels):
            stored[i] = _volume_outputs(context, spec, rows[i], gt_rows[i], volume_labels)
    found = [stored[i] for i in range(n)]
    outputs = [output for output, _, _, _ in found]
    per_volume = [entry for _, entry, _, _ in found]
    image_results = [scored for _, _, _, scored in found if scored is not None]
    metrics: dict[str, Any] = {"volumes": per_volume, "tta": spec.tta, "tile": spec.tile}
    warnings = prediction_warnings(model_metrics, [e["volume_id"] for e in per_volume if e["n_objects"] == 0])
    warnings += stream_predict.streamed_warnings([rows[i] for i in streamed])
    if warnings:
        metrics["warnings"] = warnings
    if image_results:
        reporter.update(progress=0.97, stage="scoring", force=True)
        metrics["ap"] = _ap_summary(aggregate(image_results))
    result = {
        "label_volume_ids": [output.id for output in outputs],
        "labels": {row.id: output.id for row, output in zip(rows, outputs)},
        "model_id": spec.model_id,
        "label_formats": {row.id: output.format for row, output in zip(rows, outputs)},
        object_tables.RESULT_KEY: object_tables.result_entry(context.attempt, [t for _, _, t, _ in found]),
    }
    return JobOutcome(result=result, metrics=json_safe(metrics), outputs=list(outputs))


# --------------------------------------------------------------------------- evaluate


def run_evaluate(context: JobContext) -> JobOutcome:
    """Average precision of each (ground truth, prediction) pair and over all pairs, at the spec's IoU
    thresholds or the default ones of the volumes' dimensionality."""
    from embedseg_service.core.metrics import aggregate, average_precision, default_thresholds

    spec = EvaluateSpec.model_validate(context.spec)
    reporter = context.reporter
    n = len(spec.pairs)
    results = []
    rows = []
    for i, pair in enumerate(spec.pairs):
        reporter.raise_if_cancelled(poll=i > 0)
        reporter.update(progress=i / n, stage=f"evaluating pair {i + 1}/{n}")
        gt_row, pred_row = load_volume_rows(context, [pair.gt_id, pair.pred_id])
        gt, pred = read_volume(context, gt_row), read_volume(context, pred_row)
        if gt.shape != pred.shape:
            raise ValueError(
                f"pair {i}: ground truth {gt_row.id} has shape {list(gt.shape)} but prediction {pred_row.id} "
                f"has {list(pred.shape)}"
            )
        thresholds = spec.thresholds or default_thresholds(gt.ndim)
        scored = average_precision(gt, pred, thresholds, name=pred_row.id)
        results.append(scored)
        rows.append(_image_ap(scored, gt_id=gt_row.id, pred_id=pred_row.id))
    metrics = {"pairs": rows, "ap": _ap_summary(aggregate(results))}
    return JobOutcome(result={"pairs": n}, metrics=metrics)


HANDLERS: dict[JobKind, Handler] = {
    JobKind.train: run_train,
    JobKind.predict: run_predict,
    JobKind.evaluate: run_evaluate,
}
