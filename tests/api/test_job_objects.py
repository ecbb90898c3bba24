"""The per-object table of a predict job: computed by the worker, stored beside the labels, served as JSON
pages and as CSV; owner checks and the 404/409/422 answers."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import download_labels, tiff_bytes, upload
from sqlalchemy import update

from embedseg_service.records.orm import Job, Model
from embedseg_service.records.storage import LocalStorage
from embedseg_service.worker.cleanup import purge_job_files
from embedseg_service.worker.runner import run_job

API = "/api/v1"


def _labels_a() -> np.ndarray:
    labels = np.zeros((12, 16), np.uint16)
    labels[1:4, 2:6] = 3  # 12 px, centroid (2, 3.5)
    labels[6:10, 8:14] = 7  # 24 px, centroid (7.5, 10.5)
    labels[11, 0] = 9  # 1 px
    return labels


def _gt_a() -> np.ndarray:
    gt = np.zeros((12, 16), np.uint16)
    gt[1:4, 2:8] = 1  # holds object 3: IoU 12 / 18
    gt[6:10, 2:10] = 2  # overlaps object 7 by 8 px: IoU 8 / 48, unmatched
    gt[11, 0:2] = 5  # object 9 and one more pixel: IoU exactly 0.5, matched
    return gt


def _labels_b() -> np.ndarray:
    labels = np.zeros((10, 10), np.uint16)
    labels[0:2, 0:2] = 1  # 4 px
    labels[5:10, 5:10] = 2  # 25 px
    return labels


KNOWN = {(12, 16): _labels_a(), (10, 10): _labels_b()}


@pytest.fixture
def model_id(session, settings, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    """An untrained 2D model stored like a trained one."""
    from embedseg_service.core.model.checkpoint import build_network, save_checkpoint

    net = build_network(2, 1)
    path = save_checkpoint(
        tmp_path / "tiny.pt",
        {"state_dict": net.state_dict(), "spatial_dims": 2, "in_channels": 1, "step": [1 / 1023, 1 / 1023],
         "config": {"in_channels": 1}, "properties": {"min_object_size": 4}},
    )  # fmt: skip
    LocalStorage(settings.storage_path).put_file("models/tiny.pt", path)
    model = Model(name="tiny", spatial_dims=2, config={"in_channels": 1}, storage_key="models/tiny.pt",
                  size_bytes=path.stat().st_size)  # fmt: skip
    session.add(model)
    session.commit()
    return model.id


def known_segmentation(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Replace the model's segmentation by known label images (chosen by the image's shape), so that the
    table's values are known exactly; everything else (worker, storage, API) runs for real."""
    from embedseg_service.core.model.checkpoint import TrainedModel

    monkeypatch.setattr(TrainedModel, "segment_batch",
                        lambda _model, images, **_options: [KNOWN[image.shape].copy() for image in images])  # fmt: skip


@pytest.fixture
def predicted(client, settings, model_id, monkeypatch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A succeeded predict job of two volumes with ground truth (the first with a voxel size)."""
    known_segmentation(monkeypatch)
    a = upload(client, tiff_bytes(np.zeros((12, 16), np.uint8)), name="a", voxel_size="0.5,0.25").json()
    b = upload(client, tiff_bytes(np.zeros((10, 10), np.uint8)), name="b").json()
    gt_a = upload(client, tiff_bytes(_gt_a()), kind="labels").json()["id"]
    gt_b = upload(client, tiff_bytes(_labels_b()), kind="labels").json()["id"]
    job = client.post(
        f"{API}/jobs/predict",
        json={"model_id": model_id, "volume_ids": [a["id"], b["id"]], "gt_ids": [gt_a, gt_b], "tta": False},
    ).json()
    assert run_job(job["id"], settings=settings) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
    body = client.get(f"{API}/jobs/{job['id']}").json()
    labels = body["result"]["labels"]
    return {"job": job["id"], "a": a["id"], "b": b["id"], "gt_a": gt_a, "gt_b": gt_b,
            "labels_a": labels[a["id"]], "labels_b": labels[b["id"]], "body": body}  # fmt: skip


def _objects(client, job_id: str, **params: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    response = client.get(f"{API}/jobs/{job_id}/objects", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_table_holds_each_objects_size_centroid_box_and_gt_match(client, predicted) -> None:  # type: ignore[no-untyped-def]
    p = predicted
    page = _objects(client, p["job"], volume_id=p["a"])
    assert page["total"] == 3 and page["limit"] == 100 and page["offset"] == 0
    common = {"volume_id": p["a"], "labels_id": p["labels_a"], "gt_volume_id": p["gt_a"]}
    assert page["items"] == [
        {**common, "label": 3, "voxel_count": 12, "centroid": [2.0, 3.5], "centroid_physical": [1.0, 0.875],
         "bbox_min": [1, 2], "bbox_max": [3, 5], "gt_label": 1, "iou": 12 / 18},
        {**common, "label": 7, "voxel_count": 24, "centroid": [7.5, 10.5], "centroid_physical": [3.75, 2.625],
         "bbox_min": [6, 8], "bbox_max": [9, 13], "gt_label": None, "iou": 8 / 48},
        {**common, "label": 9, "voxel_count": 1, "centroid": [11.0, 0.0], "centroid_physical": [5.5, 0.0],
         "bbox_min": [11, 0], "bbox_max": [11, 0], "gt_label": 5, "iou": 0.5},
    ]  # fmt: skip
    # the label volume's id selects the same table; the second volume has no voxel size
    assert _objects(client, p["job"], volume_id=p["labels_a"])["items"] == page["items"]
    second = _objects(client, p["job"], volume_id=p["b"])["items"]
    assert [(row["label"], row["voxel_count"], row["centroid"], row["centroid_physical"], row["gt_label"], row["iou"])
            for row in second] == [(1, 4, [0.5, 0.5], None, 1, 1.0), (2, 25, [7.0, 7.0], None, 2, 1.0)]  # fmt: skip
    # the job's result lists the tables, its metrics count the same objects
    tables = p["body"]["result"]["object_tables"]
    assert tables["attempt"] == 1
    assert [(t["volume_id"], t["labels_id"], t["gt_id"], t["n_objects"]) for t in tables["volumes"]] == [
        (p["a"], p["labels_a"], p["gt_a"], 3), (p["b"], p["labels_b"], p["gt_b"], 2)]  # fmt: skip
    assert [v["n_objects"] for v in p["body"]["metrics"]["volumes"]] == [3, 2]


def test_pages_run_volume_after_volume_and_sort_within_each(client, predicted) -> None:  # type: ignore[no-untyped-def]
    p = predicted
    every = _objects(client, p["job"])
    assert every["total"] == 5
    assert [(row["volume_id"], row["label"]) for row in every["items"]] == [
        (p["a"], 3), (p["a"], 7), (p["a"], 9), (p["b"], 1), (p["b"], 2)]  # fmt: skip
    middle = _objects(client, p["job"], limit=2, offset=2)
    assert [(row["volume_id"], row["label"]) for row in middle["items"]] == [(p["a"], 9), (p["b"], 1)]
    assert middle["total"] == 5 and middle["limit"] == 2 and middle["offset"] == 2
    assert _objects(client, p["job"], offset=5)["items"] == []
    by_size = _objects(client, p["job"], volume_id=p["a"], sort="voxel_count", descending="true")
    assert [row["label"] for row in by_size["items"]] == [7, 3, 9]
    by_iou = _objects(client, p["job"], volume_id=p["a"], sort="iou")
    assert [row["label"] for row in by_iou["items"]] == [7, 9, 3]
    smallest = _objects(client, p["job"], volume_id=p["a"], sort="voxel_count", limit=1, offset=1)
    assert [row["label"] for row in smallest["items"]] == [3]


def test_the_csv_has_a_header_and_one_row_per_object(client, predicted) -> None:  # type: ignore[no-untyped-def]
    p = predicted
    response = client.get(f"{API}/jobs/{p['job']}/objects.csv")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == f'attachment; filename="{p["job"][:8]}-objects.csv"'
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == [
        "volume_id", "labels_id", "label", "voxel_count", "centroid_y", "centroid_x", "centroid_y_physical",
        "centroid_x_physical", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x", "gt_volume_id",
        "gt_label", "iou"]  # fmt: skip
    assert [(row["volume_id"], row["label"]) for row in rows] == [
        (p["a"], "3"), (p["a"], "7"), (p["a"], "9"), (p["b"], "1"), (p["b"], "2")]  # fmt: skip
    first, second, _, fourth, _ = rows
    assert first == {
        "volume_id": p["a"], "labels_id": p["labels_a"], "label": "3", "voxel_count": "12", "centroid_y": "2.0",
        "centroid_x": "3.5", "centroid_y_physical": "1.0", "centroid_x_physical": "0.875", "bbox_min_y": "1",
        "bbox_min_x": "2", "bbox_max_y": "3", "bbox_max_x": "5", "gt_volume_id": p["gt_a"], "gt_label": "1",
        "iou": repr(12 / 18)}  # fmt: skip
    assert (second["gt_label"], float(second["iou"])) == ("", 8 / 48)
    assert (fourth["centroid_y_physical"], fourth["centroid_x_physical"], fourth["labels_id"]) == (
        "",
        "",
        p["labels_b"],
    )


def test_the_table_files_are_kept_by_the_clean_up(client, settings, predicted) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(settings.storage_path)
    before = storage.list_keys(f"jobs/{predicted['job']}")
    assert f"jobs/{predicted['job']}/a1/objects-{predicted['a']}.json" in before
    purge_job_files(storage, client.app.state.sessionmaker, [predicted["job"]])
    assert storage.list_keys(f"jobs/{predicted['job']}") == before
    assert _objects(client, predicted["job"])["total"] == 5


def test_labels_of_two_predictions_of_one_image_have_distinct_names(client, settings, model_id, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    known_segmentation(monkeypatch)
    image = upload(client, tiff_bytes(np.zeros((10, 10), np.uint8)), name="cells").json()["id"]
    names = []
    for tta in (True, False):
        job = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": [image], "tta": tta}).json()
        assert run_job(job["id"], settings=settings) == "succeeded"
        labels_id = client.get(f"{API}/jobs/{job['id']}").json()["result"]["labels"][image]
        names.append((client.get(f"{API}/volumes/{labels_id}").json()["name"], job["id"][:8]))
    (with_tta, first), (without, second) = names
    assert with_tta == f"cells-labels-{first}-tta" and without == f"cells-labels-{second}"


def test_a_real_prediction_tables_what_its_labels_hold(client, settings, model_id) -> None:  # type: ignore[no-untyped-def]
    image = np.random.default_rng(0).integers(0, 200, (40, 56)).astype(np.uint8)
    volume = upload(client, tiff_bytes(image)).json()["id"]
    job = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": [volume], "tta": False}).json()
    assert run_job(job["id"], settings=settings) == "succeeded"
    labels_id = client.get(f"{API}/jobs/{job['id']}").json()["result"]["labels"][volume]
    labels = download_labels(client, labels_id)
    rows = _objects(client, job["id"], limit=500)["items"]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert [row["label"] for row in rows] == ids.tolist()
    assert [row["voxel_count"] for row in rows] == counts.tolist()
    for row in rows:
        ys, xs = np.nonzero(labels == row["label"])
        assert row["bbox_min"] == [ys.min(), xs.min()] and row["bbox_max"] == [ys.max(), xs.max()]
        assert row["centroid"] == pytest.approx([ys.mean(), xs.mean()])
        assert row["gt_label"] is None and row["iou"] is None and row["gt_volume_id"] is None


# --------------------------------------------------------------------------- errors


def test_unknown_jobs_answer_404(client) -> None:  # type: ignore[no-untyped-def]
    for path in ("objects", "objects.csv"):
        response = client.get(f"{API}/jobs/{'0' * 36}/{path}")
        assert response.status_code == 404
        assert response.json() == {"detail": f"Job {'0' * 36} not found"}


def _conflict(client, job_id: str) -> list[Any]:  # type: ignore[no-untyped-def]
    answers = [client.get(f"{API}/jobs/{job_id}/{path}") for path in ("objects", "objects.csv")]
    assert [answer.status_code for answer in answers] == [409, 409]
    return [answer.json() for answer in answers]


def test_jobs_without_a_table_answer_409(client, session, model_id, predicted) -> None:  # type: ignore[no-untyped-def]
    gt = upload(client, tiff_bytes(_gt_a()), kind="labels").json()["id"]
    evaluate = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": gt, "pred_id": gt}]}).json()["id"]
    detail = {"detail": f"Job {evaluate} is an evaluate job; only predict jobs have object tables"}
    assert _conflict(client, evaluate) == [detail, detail]
    queued = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": [predicted["a"]]}).json()
    detail = {"detail": f"Job {queued['id']} is queued; its object table is available once it has succeeded"}
    assert _conflict(client, queued["id"]) == [detail, detail]
    # a job that ran before tables were recorded
    older = dict(predicted["body"]["result"])
    older.pop("object_tables")
    session.execute(update(Job).where(Job.id == predicted["job"]).values(result=older))
    session.commit()
    detail = {"detail": f"Job {predicted['job']} has no object table: it ran before the service recorded them; "
                        "run the prediction again"}  # fmt: skip
    assert _conflict(client, predicted["job"]) == [detail, detail]


def test_a_missing_table_file_answers_409(client, settings, predicted) -> None:  # type: ignore[no-untyped-def]
    assert LocalStorage(settings.storage_path).delete(f"jobs/{predicted['job']}/a1/objects-{predicted['b']}.json")
    assert _objects(client, predicted["job"], volume_id=predicted["a"])["total"] == 3  # the other table still reads
    response = client.get(f"{API}/jobs/{predicted['job']}/objects.csv")
    assert response.status_code == 409
    assert response.json() == {"detail": f"the object table of volume {predicted['b']} of job {predicted['job']} "
                                         "is missing; run the prediction again"}  # fmt: skip


def test_bad_queries_answer_422(client, predicted) -> None:  # type: ignore[no-untyped-def]
    job = predicted["job"]
    response = client.get(f"{API}/jobs/{job}/objects", params={"volume_id": predicted["gt_a"]})
    assert response.status_code == 422
    assert response.json() == {"detail": f"query.volume_id: volume {predicted['gt_a']} is not a volume of job {job}; "
                                         "give one of its input volume ids or label volume ids"}  # fmt: skip
    response = client.get(f"{API}/jobs/{job}/objects", params={"limit": 501})
    assert response.status_code == 422 and response.json() == {"detail": "query.limit: must be at most 500"}
    response = client.get(f"{API}/jobs/{job}/objects", params={"sort": "size"})
    assert response.status_code == 422
    assert response.json() == {"detail": "query.sort: Input should be 'label', 'voxel_count' or 'iou'"}
