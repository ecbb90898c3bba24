"""Predict jobs on volumes larger than memory: streamed prediction into a zipped OME-Zarr label volume
(docs/method.md §11.5).

A volume streams when it is stored as OME-Zarr or when its float32 size exceeds the setting
``stream_above_bytes``. It is read a region at a time (an OME-Zarr image by its chunks, a TIFF by windows
of its pages), the network's cell grid lives in files under the job's scratch folder, and the labels are
written window by window into an OME-Zarr folder there, then zipped and stored as one object. The object
table comes from the statistics the writer keeps. Ground truth, when given, is read a chunk at a time beside
the written labels (:mod:`embedseg_service.core.metrics_sparse`): the AP and the object table's matches are
those of the whole volumes. Test-time augmentation streams too (:mod:`embedseg_service.core.inference.stream_tta`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from embedseg_service.records import object_tables
from embedseg_service.records.orm import Volume, VolumeFormat, VolumeKind, new_id
from embedseg_service.records.schemas import PredictSpec
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import OME_ZARR_ZIP_SUFFIX
from embedseg_service.worker.context import JobContext
from embedseg_service.worker.progress import JobCancelled

LABEL_CHUNKS = {3: (32, 256, 256), 2: (1024, 1024)}
"""Chunk shape of streamed label volumes (at most 8 MiB of uint32 each)."""
CHUNK = 1024 * 1024


def streams(settings: Settings, row: Volume) -> bool:
    """Whether a predict job streams the volume ``row``: stored as OME-Zarr, or more float32 bytes than
    ``settings.stream_above_bytes``."""
    size = 4 * row.n_channels * math.prod(row.spatial_shape)
    return row.format == VolumeFormat.ome_zarr.value or size > settings.stream_above_bytes


def streamed_warnings(rows: Sequence[Volume]) -> list[str]:
    """What a user should know about the streamed volumes of a predict job (none: no warning)."""
    if not rows:
        return []
    ids = ", ".join(row.id for row in rows)
    return [f"volume(s) {ids} were predicted in streamed windows (docs/method.md §11.5) into OME-Zarr labels"]


@contextmanager
def volume_source(context: JobContext, row: Volume) -> Iterator[Any]:
    """The stored volume ``row`` as a :class:`embedseg_service.core.data.volume_source.VolumeSource`."""
    from embedseg_service.core.data.ome_zarr import OmeZarrVolume
    from embedseg_service.core.data.volume_source import OmeZarrSource, TiffSource

    path = context.storage.path_for(row.storage_key)
    if row.format == VolumeFormat.ome_zarr.value:
        with OmeZarrVolume(path) as volume:
            yield OmeZarrSource(volume)
    else:
        with TiffSource(path) as source:
            yield source


def _store(context: JobContext, name: str, path: Any) -> tuple[str, str, int]:
    """Store a local file under the attempt's key ``name`` while the claim is this worker's: (key, sha256, size)."""
    context.reporter.check_claim()
    key = context.output_key(name)
    with open(path, "rb") as handle:
        written = context.storage.put(key, iter(lambda: handle.read(CHUNK), b""))
    return key, written.sha256, written.size


def _segment(context: JobContext, model: Any, spec: PredictSpec, source: Any, out: Any,
             progress: Callable[[int, int], bool | None]) -> Any:  # fmt: skip
    """:func:`embedseg_service.core.inference.stream.segment_streamed` with the model's settings."""
    from embedseg_service.core.inference.stream import segment_streamed
    from embedseg_service.core.inference.tiling import PredictionCancelled

    tile: str | tuple[int, ...] = spec.tile if isinstance(spec.tile, str) else tuple(spec.tile)
    try:
        return segment_streamed(
            model.net, source, out, step=model.step, normalization=model.normalization,
            min_size=model.min_object_size if spec.min_size is None else spec.min_size,
            max_radius=model.max_seed_radius, tile=tile, device=model.device,
            precision=context.settings.inference_precision, tta=spec.tta, scratch=context.scratch, progress=progress,
        )  # fmt: skip
    except PredictionCancelled:
        raise JobCancelled(context.job_id) from None


def check_ground_truth(row: Volume, gt_row: Volume | None) -> None:
    """Raise ``ValueError`` unless the ground truth ``gt_row`` (when given) has the shape of the volume ``row``
    (the API checks it at submission too)."""
    if gt_row is not None and gt_row.spatial_shape != row.spatial_shape:
        raise ValueError(
            f"ground truth {gt_row.id} has shape {list(gt_row.spatial_shape)} but volume {row.id} has "
            f"{list(row.spatial_shape)}; give the mask of the same image"
        )


def _overlaps(context: JobContext, gt_row: Volume, labels: Any) -> Any:
    """The overlap counts of the ground truth ``gt_row`` and the written ``labels``, a label chunk at a time."""
    from embedseg_service.core.data.volume_source import blocks
    from embedseg_service.core.metrics_sparse import OverlapCounts

    counts = OverlapCounts()
    with volume_source(context, gt_row) as gt:
        for region in blocks(labels.shape, labels.chunks):
            context.reporter.raise_if_cancelled(poll=True)
            counts.add(gt.read(region)[0], np.asarray(labels[region]))
    return counts


def _table(context: JobContext, row: Volume, output: Volume, rows: list[dict[str, Any]], gt_id: str | None,
           matches: dict[int, tuple[int | None, float]] | None) -> dict[str, Any]:  # fmt: skip
    """Store the object table of the streamed labels (with their ground truth ``matches`` when scored); returns
    its entry of ``result["object_tables"]``."""
    from embedseg_service.core.metrics import OBJECT_MATCH_THRESHOLD

    for item in rows if matches is not None else []:
        item["gt_label"], item["iou"] = matches.get(item["label"], (None, 0.0))
    table = {"volume_id": row.id, "labels_id": output.id, "gt_id": gt_id, "axes": output.axes,
             "voxel_size": output.voxel_size, "match_threshold": OBJECT_MATCH_THRESHOLD if gt_id else None,
             "objects": rows}  # fmt: skip
    local = context.scratch / object_tables.table_name(row.id)
    local.write_text(json.dumps(table, separators=(",", ":")), encoding="utf-8")
    _store(context, local.name, local)
    local.unlink(missing_ok=True)
    return {"volume_id": row.id, "labels_id": output.id, "gt_id": gt_id, "n_objects": len(rows)}


Outputs = tuple[Volume, dict[str, Any], dict[str, Any], Any]


def predict_streamed(
    context: JobContext, model: Any, spec: PredictSpec, row: Volume, gt_row: Volume | None,
    progress: Callable[[int, int], bool | None],
) -> Outputs:  # fmt: skip
    """Segment the stored volume ``row`` in streamed windows and score the labels against ``gt_row`` when given;
    returns (its labels row, its metrics entry, its object table entry, its AP result or ``None``), as the
    handler's whole-volume path does."""
    from embedseg_service.core.data.ome_zarr import create_labels, zip_folder
    from embedseg_service.core.metrics import OBJECT_MATCH_THRESHOLD
    from embedseg_service.core.metrics_sparse import average_precision_of_counts, object_matches

    spatial = row.spatial_shape
    voxel = row.voxel_size if row.voxel_size and len(row.voxel_size) == len(spatial) else None
    folder = context.scratch / f"labels-{row.id}.ome.zarr"
    archive = context.scratch / f"labels-{row.id}{OME_ZARR_ZIP_SUFFIX}"
    check_ground_truth(row, gt_row)
    counts = None
    try:
        with volume_source(context, row) as source:
            chunks = tuple(min(c, n) for c, n in zip(LABEL_CHUNKS[len(spatial)], spatial))
            out = create_labels(folder, spatial, voxel_size=voxel, chunks=chunks, name=f"{row.name}-labels")
            result = _segment(context, model, spec, source, out, progress)
        if gt_row is not None:
            counts = _overlaps(context, gt_row, out)
        zip_folder(folder, archive)
        key, sha256, size = _store(context, archive.name, archive)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        archive.unlink(missing_ok=True)
    output = Volume(id=new_id(), name=context.labels_name(row.name, spec.tta), kind=VolumeKind.labels.value,
                    sha256=sha256, shape=list(spatial), dtype="uint32", axes="YX" if len(spatial) == 2 else "ZYX",
                    voxel_size=voxel, size_bytes=size, storage_key=key, image_volume_id=row.id)  # fmt: skip
    entry = {"volume_id": row.id, "labels_id": output.id, "n_objects": result.n_objects,
             "format": VolumeFormat.ome_zarr.value,
             "streamed": {"windows": result.windows, "core": list(result.core), "margin": list(result.margin),
                          "duplicates": result.duplicates, "cut": result.cut}}  # fmt: skip
    scored = matches = None
    if counts is not None:
        scored = average_precision_of_counts(counts, ndim=len(spatial), name=row.id)
        matches = object_matches(counts, OBJECT_MATCH_THRESHOLD)
    table = _table(context, row, output, result.objects.rows(voxel), gt_row and gt_row.id, matches)
    return output, entry, table, scored
