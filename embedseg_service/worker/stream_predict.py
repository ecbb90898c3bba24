"""Predict jobs on volumes larger than memory: streamed prediction into a zipped OME-Zarr label volume
(docs/method.md §11.5).

A volume streams when it is stored as OME-Zarr or when its float32 size exceeds the setting
``stream_above_bytes``. It is read a region at a time (an OME-Zarr image by its chunks, a TIFF by windows
of its pages), the network's cell grid lives in files under the job's scratch folder, and the labels are
written window by window into an OME-Zarr folder there, then zipped and stored as one object. The object
table comes from the statistics the writer keeps. Test-time augmentation and scoring against ground truth
are not applied to streamed volumes; the job's warnings say so.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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


def streamed_warnings(spec: PredictSpec, rows: Sequence[Volume], gt_given: bool) -> list[str]:
    """What a user should know about the streamed volumes of a predict job (none: no warning)."""
    if not rows:
        return []
    ids = ", ".join(row.id for row in rows)
    warnings = [f"volume(s) {ids} were predicted in streamed windows (docs/method.md §11.5) into OME-Zarr labels"]
    if spec.tta:
        warnings.append(f"test-time augmentation was not applied to the streamed volume(s) {ids}")
    if gt_given:
        warnings.append(f"the streamed volume(s) {ids} were not scored against their ground truth")
    return warnings


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
             progress: Callable[[int, int], bool]) -> Any:  # fmt: skip
    """:func:`embedseg_service.core.inference.stream.segment_streamed` with the model's settings."""
    from embedseg_service.core.inference.stream import segment_streamed
    from embedseg_service.core.inference.tiling import PredictionCancelled

    tile: str | tuple[int, ...] = spec.tile if isinstance(spec.tile, str) else tuple(spec.tile)
    try:
        return segment_streamed(
            model.net, source, out, step=model.step, normalization=model.normalization,
            min_size=model.min_object_size if spec.min_size is None else spec.min_size,
            max_radius=model.max_seed_radius, tile=tile, device=model.device,
            precision=context.settings.inference_precision, scratch=context.scratch, progress=progress,
        )  # fmt: skip
    except PredictionCancelled:
        raise JobCancelled(context.job_id) from None


def _table(context: JobContext, row: Volume, output: Volume, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Store the object table of the streamed labels; returns its entry of ``result["object_tables"]``."""
    table = {"volume_id": row.id, "labels_id": output.id, "gt_id": None, "axes": output.axes,
             "voxel_size": output.voxel_size, "match_threshold": None, "objects": rows}  # fmt: skip
    local = context.scratch / object_tables.table_name(row.id)
    local.write_text(json.dumps(table, separators=(",", ":")), encoding="utf-8")
    _store(context, local.name, local)
    local.unlink(missing_ok=True)
    return {"volume_id": row.id, "labels_id": output.id, "gt_id": None, "n_objects": len(rows)}


Outputs = tuple[Volume, dict[str, Any], dict[str, Any], None]


def predict_streamed(
    context: JobContext, model: Any, spec: PredictSpec, row: Volume, progress: Callable[[int, int], bool]
) -> Outputs:
    """Segment the stored volume ``row`` in streamed windows; returns (its labels row, its metrics entry, its
    object table entry, no AP result), as the handler's whole-volume path does."""
    from embedseg_service.core.data.ome_zarr import create_labels, zip_folder

    spatial = row.spatial_shape
    voxel = row.voxel_size if row.voxel_size and len(row.voxel_size) == len(spatial) else None
    folder = context.scratch / f"labels-{row.id}.ome.zarr"
    archive = context.scratch / f"labels-{row.id}{OME_ZARR_ZIP_SUFFIX}"
    try:
        with volume_source(context, row) as source:
            chunks = tuple(min(c, n) for c, n in zip(LABEL_CHUNKS[len(spatial)], spatial))
            out = create_labels(folder, spatial, voxel_size=voxel, chunks=chunks, name=f"{row.name}-labels")
            result = _segment(context, model, spec, source, out, progress)
        zip_folder(folder, archive)
        key, sha256, size = _store(context, archive.name, archive)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        archive.unlink(missing_ok=True)
    output = Volume(id=new_id(), name=f"{row.name}-labels-{context.job_id[:8]}", kind=VolumeKind.labels.value,
                    sha256=sha256, shape=list(spatial), dtype="uint32", axes="YX" if len(spatial) == 2 else "ZYX",
                    voxel_size=voxel, size_bytes=size, storage_key=key, image_volume_id=row.id)  # fmt: skip
    entry = {"volume_id": row.id, "labels_id": output.id, "n_objects": result.n_objects,
             "format": VolumeFormat.ome_zarr.value,
             "streamed": {"windows": result.windows, "core": list(result.core), "margin": list(result.margin),
                          "duplicates": result.duplicates, "cut": result.cut}}  # fmt: skip
    table = _table(context, row, output, result.objects.rows(voxel))
    return output, entry, table, None
