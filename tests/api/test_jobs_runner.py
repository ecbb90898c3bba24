"""The job runner and its handlers against the real database (SQLite and PostgreSQL), without a broker.

Claim once, outputs registered with success, failures and cancellation on the row, throttled
progress, recovery of jobs whose worker was lost, and the predict/evaluate handlers on real
stored volumes.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import disks, tiff_bytes, upload
from sqlalchemy import update

from embedseg_service.core.data.io import read_tiff
from embedseg_service.records import jobs
from embedseg_service.records.orm import Job, JobKind, JobStatus, Model, Volume, VolumeKind, new_id, utcnow
from embedseg_service.records.storage import LocalStorage
from embedseg_service.worker.context import JobContext, JobOutcome
from embedseg_service.worker.progress import JobCancelled, JobReporter
from embedseg_service.worker.runner import recover_stale_jobs, run_job

API = "/api/v1"


def _labels(shape=(48, 64), boxes=((4, 14, 6, 20), (20, 40, 30, 50))) -> np.ndarray:  # type: ignore[no-untyped-def]
    labels = np.zeros(shape, np.uint16)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


@pytest.fixture
def fast(settings):  # type: ignore[no-untyped-def]
    return settings.model_copy(update={"progress_throttle_s": 0.05, "heartbeat_s": 0.2})


@pytest.fixture
def evaluate_job(client) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    gt = upload(client, tiff_bytes(_labels()), kind="labels").json()["id"]
    pred_labels = _labels(boxes=((4, 14, 6, 20),))  # one of the two objects found
    pred = upload(client, tiff_bytes(pred_labels), kind="labels").json()["id"]
    job = client.post(
        f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": gt, "pred_id": pred}], "thresholds": [0.5, 0.9]}
    )
    assert job.status_code == 202, job.text
    return job.json()["id"], gt, pred


def _fake_handlers(outcome=None, error=None, calls=None):  # type: ignore[no-untyped-def]
    def handler(context: JobContext) -> JobOutcome:
        if calls is not None:
            calls.append(context.job_id)
        if error is not None:
            raise error
        return outcome(context) if outcome else JobOutcome(result={})

    return dict.fromkeys(JobKind, handler)


# --------------------------------------------------------------------------- claim once, outcomes


def test_evaluate_job_runs_once_and_writes_its_ap_table(client, fast, evaluate_job) -> None:
    job_id, gt, pred = evaluate_job
    assert run_job(job_id, settings=fast, name="host-a:1") == "succeeded"
    body = client.get(f"{API}/jobs/{job_id}").json()
    assert body["status"] == "succeeded" and body["progress"] == 1.0 and body["stage"] == "succeeded"
    assert body["worker"] == "host-a:1" and body["attempts"] == 1 and body["error"] is None
    assert body["started_at"] <= body["finished_at"]
    assert body["result"] == {"pairs": 1}
    ap = body["metrics"]["ap"]
    assert ap["thresholds"] == [0.5, 0.9]
    assert ap["ap"] == [0.5, 0.5]  # TP 1, FN 1, FP 0
    assert ap["pooled"][0]["tp"] == 1 and ap["pooled"][0]["fn"] == 1 and ap["pooled"][0]["fp"] == 0
    (pair,) = body["metrics"]["pairs"]
    assert (pair["gt_id"], pair["pred_id"], pair["n_gt"], pair["n_pred"]) == (gt, pred, 2, 1)

    # the same message delivered again, or to another worker, does nothing
    assert run_job(job_id, settings=fast, name="host-b:2") == "skipped"
    again = client.get(f"{API}/jobs/{job_id}").json()
    assert again["worker"] == "host-a:1" and again["attempts"] == 1 and again["finished_at"] == body["finished_at"]


def test_two_deliveries_racing_run_the_job_once(fast, evaluate_job) -> None:
    job_id, _, _ = evaluate_job
    calls: list[str] = []
    barrier = threading.Barrier(2)

    def slow(context: JobContext) -> JobOutcome:
        return JobOutcome(result={"ran": context.job_id})

    outcomes: list[str] = []

    def deliver(name: str) -> None:
        barrier.wait()
        outcomes.append(run_job(job_id, settings=fast, name=name, handlers=_fake_handlers(slow, calls=calls)))

    threads = [threading.Thread(target=deliver, args=(f"w{i}:1",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["skipped", "succeeded"]
    assert calls == [job_id]


def test_unknown_job_is_dropped(fast) -> None:
    assert run_job("no-such-job", settings=fast) == "missing"


def test_a_cancelled_queued_job_never_runs(client, fast, evaluate_job) -> None:
    job_id, _, _ = evaluate_job
    client.post(f"{API}/jobs/{job_id}/cancel")
    calls: list[str] = []
    assert run_job(job_id, settings=fast, handlers=_fake_handlers(calls=calls)) == "skipped"
    assert calls == []
    assert client.get(f"{API}/jobs/{job_id}").json()["status"] == "cancelled"


def test_handler_error_fails_the_job_with_its_message(client, fast, evaluate_job) -> None:
    job_id, _, _ = evaluate_job
    handlers = _fake_handlers(error=ValueError("the image has 3 channels but the model expects 1"))
    assert run_job(job_id, settings=fast, handlers=handlers) == "failed"
    body = client.get(f"{API}/jobs/{job_id}").json()
    assert body["status"] == "failed"
    assert body["error"] == "the image has 3 channels but the model expects 1"
    assert body["finished_at"] is not None and body["result"] is None

    other = client.post(f"{API}/jobs/evaluate", json=body["spec"]).json()["id"]
    assert run_job(other, settings=fast, handlers=_fake_handlers(error=RuntimeError("CUDA out of memory"))) == "failed"
    assert client.get(f"{API}/jobs/{other}").json()["error"] == (
        "out of memory: CUDA out of memory; use a smaller tile, batch or crop size"
    )


def test_outputs_are_registered_only_with_success(client, session, fast, evaluate_job, settings) -> None:
    job_id, gt, _ = evaluate_job
    storage = LocalStorage(settings.storage_path)

    def produce(context: JobContext) -> JobOutcome:
        written = storage.put(f"jobs/{context.job_id}/labels-x.tif", [b"II*\x00data"])
        row = Volume(
            id=new_id(),
            name="out",
            kind=VolumeKind.labels.value,
            sha256=written.sha256,
            shape=[2, 2],
            dtype="uint16",
            axes="YX",
            size_bytes=written.size,
            storage_key=written.key,
            image_volume_id=gt,
        )
        return JobOutcome(result={"label_volume_ids": [row.id]}, outputs=[row])

    assert run_job(job_id, settings=fast, handlers=_fake_handlers(produce)) == "succeeded"
    body = client.get(f"{API}/jobs/{job_id}").json()
    (out_id,) = body["result"]["label_volume_ids"]
    out = client.get(f"{API}/volumes/{out_id}").json()
    assert out["source_job_id"] == job_id and out["image_volume_id"] == gt and out["kind"] == "labels"

    # a late duplicate that somehow ran cannot register its outputs a second time
    session.expire_all()
    assert not jobs.finish_job(
        session,
        job_id,
        JobStatus.succeeded,
        outputs=[
            Volume(
                name="dup",
                kind="labels",
                sha256="0" * 64,
                shape=[2, 2],
                dtype="uint16",
                axes="YX",
                size_bytes=1,
                storage_key=f"jobs/{job_id}/dup.tif",
            )
        ],
    )
    assert client.get(f"{API}/volumes", params={"kind": "labels"}).json()["total"] == 3  # gt, pred, out


def test_cancel_while_running_stops_at_the_next_step(client, fast, evaluate_job) -> None:
    job_id, _, _ = evaluate_job
    steps: list[int] = []

    def long_job(context: JobContext) -> JobOutcome:
        for step in range(10_000):
            steps.append(step)
            if step == 3:
                assert client.post(f"{API}/jobs/{job_id}/cancel").json()["cancel_requested"] is True
            if not context.reporter.update(progress=step / 10_000, stage=f"step {step}", force=True):
                raise JobCancelled(job_id)
        raise AssertionError("the job was not cancelled")

    assert run_job(job_id, settings=fast, handlers=_fake_handlers(long_job)) == "cancelled"
    body = client.get(f"{API}/jobs/{job_id}").json()
    assert body["status"] == "cancelled" and body["error"] == "cancelled on request"
    assert steps == [0, 1, 2, 3]  # the write right after the request sees the flag
    assert client.post(f"{API}/jobs/{job_id}/cancel").status_code == 409


# --------------------------------------------------------------------------- progress


def test_progress_is_throttled_and_the_heartbeat_beats(session, evaluate_job, app) -> None:
    job_id, _, _ = evaluate_job
    assert jobs.claim_job(session, job_id, "me:1")
    now = [100.0]
    reporter = JobReporter(job_id, app.state.sessionmaker, throttle_s=1.0, heartbeat_s=0.1, clock=lambda: now[0])
    assert reporter.update(progress=0.1, stage="a") is True  # first call writes
    now[0] = 100.5
    reporter.update(progress=0.2, stage="b", eta_s=30, metrics={"epochs": [{"epoch": 1}]})  # throttled
    assert reporter.writes == 1
    row = jobs.get_job(session, job_id)
    assert (row.progress, row.stage, row.metrics) == (0.1, "a", None)
    now[0] = 101.2
    reporter.update(progress=0.3)
    assert reporter.writes == 2
    row = jobs.get_job(session, job_id)
    assert (row.progress, row.stage, row.eta_s, row.metrics) == (0.3, "b", 30.0, {"epochs": [{"epoch": 1}]})

    beat = row.heartbeat_at
    with reporter:
        jobs.request_cancel(session, job_id)
        for _ in range(100):
            if reporter.cancel_requested:
                break
            threading.Event().wait(0.05)
    assert reporter.cancel_requested and reporter.should_continue() is False
    assert jobs.get_job(session, job_id).heartbeat_at > beat
    with pytest.raises(JobCancelled):
        reporter.raise_if_cancelled()


# --------------------------------------------------------------------------- lost workers


def _age_heartbeat(session, job_id: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
    session.commit()


def test_a_job_whose_worker_stopped_beating_is_requeued_then_failed_after_three_losses(
    session, fast, evaluate_job
) -> None:
    job_id, _, _ = evaluate_job
    for attempt in (1, 2):
        assert jobs.claim_job(session, job_id, f"dead:{attempt}")
        assert recover_stale_jobs(fast) == []  # fresh heartbeat: still alive
        _age_heartbeat(session, job_id, 60)
        assert recover_stale_jobs(fast) == [job_id]
        row = jobs.get_job(session, job_id)
        assert (row.status, row.worker, row.attempts) == ("queued", None, attempt)
    assert jobs.claim_job(session, job_id, "dead:3")
    _age_heartbeat(session, job_id, 60)
    assert recover_stale_jobs(fast) == []
    row = jobs.get_job(session, job_id)
    assert row.status == "failed"
    assert row.error == (
        "the worker running this job was lost 3 times (killed or out of memory); resubmit it with "
        "smaller inputs, a smaller tile or batch size"
    )


def test_a_redelivered_message_takes_over_from_a_lost_worker(session, fast, evaluate_job) -> None:
    job_id, _, _ = evaluate_job
    assert jobs.claim_job(session, job_id, "lost:1")
    assert run_job(job_id, settings=fast, name="second:2") == "skipped"  # the first may still be alive
    _age_heartbeat(session, job_id, 60)
    assert run_job(job_id, settings=fast, name="second:2") == "succeeded"
    row = jobs.get_job(session, job_id)
    assert (row.worker, row.attempts) == ("second:2", 2)


# --------------------------------------------------------------------------- predict handler


@pytest.fixture
def tiny_model(session, settings, tmp_path: Path) -> str:
    """An untrained 2D model stored like a trained one."""
    from embedseg_service.core.model.checkpoint import build_network

    return _store_model(session, settings, tmp_path, "tiny", build_network(2, 1), [1 / 1023, 1 / 1023])


def _store_model(session, settings, tmp_path: Path, name: str, net, step: list[float]) -> str:  # type: ignore[no-untyped-def]
    """Save ``net`` as a checkpoint (minimum object size 4), put it in storage and register it; its id."""
    from embedseg_service.core.model.checkpoint import save_checkpoint

    dims = len(step)
    path = save_checkpoint(
        tmp_path / f"{name}.pt",
        {
            "state_dict": net.state_dict(),
            "spatial_dims": dims,
            "in_channels": 1,
            "step": step,
            "config": {"in_channels": 1},
            "properties": {"min_object_size": 4},
        },
    )
    LocalStorage(settings.storage_path).put_file(f"models/{name}.pt", path)
    model = Model(
        name=name,
        spatial_dims=dims,
        config={"in_channels": 1},
        storage_key=f"models/{name}.pt",
        size_bytes=path.stat().st_size,
    )
    session.add(model)
    session.commit()
    return model.id


def test_predict_job_writes_linked_label_volumes_and_scores_them(client, fast, tiny_model) -> None:
    rng = np.random.default_rng(0)
    image = upload(
        client,
        tiff_bytes(rng.integers(0, 200, (40, 56)).astype(np.uint8), imagej=True, resolution=(1 / 0.5, 1 / 0.5)),
        name="cells",
    ).json()
    gt = upload(client, tiff_bytes(_labels((40, 56))), kind="labels").json()["id"]
    job = client.post(
        f"{API}/jobs/predict",
        json={"model_id": tiny_model, "volume_ids": [image["id"]], "gt_ids": [gt], "tile": [32, 32]},
    ).json()
    assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
    body = client.get(f"{API}/jobs/{job['id']}").json()
    (labels_id,) = body["result"]["label_volume_ids"]
    assert body["result"]["labels"] == {image["id"]: labels_id}
    labels = client.get(f"{API}/volumes/{labels_id}").json()
    assert labels["kind"] == "labels" and labels["shape"] == [40, 56] and labels["axes"] == "YX"
    assert labels["image_volume_id"] == image["id"] and labels["source_job_id"] == job["id"]
    assert labels["name"] == f"cells-labels-{job['id'][:8]}-tta"  # TTA is on by default
    assert labels["voxel_size"] == pytest.approx(image["voxel_size"])
    download = client.get(f"{API}/volumes/{labels_id}/download")
    assert download.status_code == 200
    stored = read_tiff(io.BytesIO(download.content))
    assert stored.data.shape == (40, 56) and np.issubdtype(stored.data.dtype, np.integer)
    (volume,) = body["metrics"]["volumes"]
    assert volume["gt_id"] == gt and volume["n_gt"] == 2 and volume["n_pred"] == volume["n_objects"]
    ap = body["metrics"]["ap"]
    assert len(ap["ap"]) == len(ap["thresholds"]) == 9 and all(0.0 <= v <= 1.0 for v in ap["ap"])


def test_predict_job_cancelled_before_a_volume_stops_without_outputs(client, fast, tiny_model) -> None:
    image = upload(client, tiff_bytes(np.zeros((32, 32), np.uint8))).json()["id"]
    job_id = client.post(f"{API}/jobs/predict", json={"model_id": tiny_model, "volume_ids": [image]}).json()["id"]

    def cancel_then_predict(context: JobContext) -> JobOutcome:
        from embedseg_service.worker.handlers import run_predict

        with context.session() as other:
            jobs.request_cancel(other, context.job_id)
        return run_predict(context)

    assert run_job(job_id, settings=fast, handlers=_fake_handlers(cancel_then_predict)) == "cancelled"
    assert client.get(f"{API}/volumes", params={"kind": "labels"}).json()["total"] == 0
    assert client.get(f"{API}/jobs/{job_id}").json()["status"] == "cancelled"


def test_predict_job_cancelled_between_volumes_stops_at_the_next_progress_write(
    client, fast, tiny_model, monkeypatch
) -> None:
    import time

    from embedseg_service.worker import handlers

    images = [upload(client, tiff_bytes(np.zeros((32, w), np.uint8))).json()["id"] for w in (32, 40, 48)]
    job_id = client.post(f"{API}/jobs/predict", json={"model_id": tiny_model, "volume_ids": images}).json()["id"]
    stored: list[str] = []
    store = handlers._volume_outputs

    def store_then_cancel(context: JobContext, spec, row, gt_row, labels):  # type: ignore[no-untyped-def]
        outputs = store(context, spec, row, gt_row, labels)
        stored.append(row.id)
        with context.session() as other:
            jobs.request_cancel(other, context.job_id)
        time.sleep(2 * fast.progress_throttle_s)  # the next batch's progress is then due, and its write reads the flag
        return outputs

    monkeypatch.setattr(handlers, "_volume_outputs", store_then_cancel)
    assert run_job(job_id, settings=fast) == "cancelled"
    assert stored == images[:1]  # three shapes, three batches: the second never ran
    assert client.get(f"{API}/volumes", params={"kind": "labels"}).json()["total"] == 0


def test_predict_job_with_an_unusable_checkpoint_fails_with_the_reason(client, session, fast, settings) -> None:
    LocalStorage(settings.storage_path).put("models/bad.pt", [b"not a checkpoint"])
    model = Model(name="bad", spatial_dims=2, config={}, storage_key="models/bad.pt", size_bytes=16)
    session.add(model)
    session.commit()
    image = upload(client, tiff_bytes(np.zeros((32, 32), np.uint8))).json()["id"]
    job_id = client.post(f"{API}/jobs/predict", json={"model_id": model.id, "volume_ids": [image]}).json()["id"]
    assert run_job(job_id, settings=fast) == "failed"
    error = client.get(f"{API}/jobs/{job_id}").json()["error"]
    assert "is not an EmbedSeg model file" in error


# --------------------------------------------------------------------------- embedded local worker


def test_local_worker_runs_jobs_left_queued_and_orphaned_by_a_previous_run(
    client, session, settings, evaluate_job
) -> None:
    import socket

    from embedseg_service.worker.local import LocalWorker

    left_queued, _, _ = evaluate_job
    orphan = client.post(f"{API}/jobs/evaluate", json=client.get(f"{API}/jobs/{left_queued}").json()["spec"]).json()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_name = f"{socket.gethostname()}:{int(dead.stdout)}"
    assert jobs.claim_job(session, orphan["id"], dead_name)

    worker = LocalWorker(settings.model_copy(update={"progress_throttle_s": 0.05}), poll_s=0.5).start()
    try:
        deadline = time.monotonic() + 180
        while True:
            statuses = [client.get(f"{API}/jobs/{j}").json() for j in (left_queued, orphan["id"])]
            if all(body["status"] == "succeeded" for body in statuses):
                break
            assert time.monotonic() < deadline, statuses
            time.sleep(0.5)
        assert statuses[1]["attempts"] == 2 and statuses[1]["worker"] not in (None, dead_name)

        # a job submitted while the worker runs is picked up at once
        fresh = client.post(f"{API}/jobs/evaluate", json=statuses[0]["spec"]).json()["id"]
        worker.submit(fresh)
        while client.get(f"{API}/jobs/{fresh}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        worker.stop()
    assert not worker.alive


@pytest.mark.slow
def test_train_job_takes_the_voxel_size_from_the_image_and_registers_a_model(client, fast) -> None:
    labels = disks()
    image = (20 + 150 * (labels > 0)).astype(np.uint8)
    image_id = upload(client, tiff_bytes(image), voxel_size="0.5,0.5").json()["id"]
    mask_id = upload(client, tiff_bytes(labels), kind="labels").json()["id"]
    job = client.post(
        f"{API}/jobs/train",
        json={
            "image_ids": [image_id],
            "mask_ids": [mask_id],
            "epochs": 1,
            "crop_size": 32,
            "batch_size": 2,
            "max_time_minutes": 0.2,
            "amp": True,
            "min_object_size": 20,
            "foreground_weight": 4.5,
        },
    ).json()
    assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
    body = client.get(f"{API}/jobs/{job['id']}").json()
    model = client.get(f"{API}/models/{body['result']['model_id']}").json()
    assert model["config"]["voxel_size"] == [0.5, 0.5] and model["config"]["crop_size"] == [32, 32]
    assert model["config"]["amp"] is True  # the spec's option reaches the training (a no-op on the CPU)
    # the overrides replace the data-derived values and are marked as set by the user
    properties = model["data_properties"]
    assert properties["min_object_size"] == 20 and properties["foreground_weight"] == 4.5
    assert {"min_object_size", "foreground_weight"} <= set(properties["overrides"])
    assert model["source_job_id"] == job["id"] and model["name"] == f"model of job {job['id'][:8]}"
    assert model["metrics"]["stopped"] in ("completed", "time_budget") and model["metrics"]["history"]
    assert body["metrics"]["epochs_total"] == 1 and body["metrics"]["best_epoch"] == model["metrics"]["best_epoch"]
    # one epoch rarely finds objects: the job says so exactly when the saved model is degenerate
    assert ("warnings" in body["metrics"]) == bool(model["metrics"]["best"].get("degenerate"))


def test_predict_job_min_size_overrides_the_models_minimum_object_size(
    client, session, settings, fast, tmp_path
) -> None:
    """A network whose seed map is high everywhere: clustering tiles the image into small objects
    (about 100 pixels each, bandwidth e^10 at zero offsets); min_size above that leaves none."""
    import torch

    from embedseg_service.core.model.checkpoint import build_network

    net = build_network(2, 1)
    with torch.no_grad():
        net.decoders[1].output_conv.weight.zero_()
        net.decoders[1].output_conv.bias.fill_(10.0)
    model_id = _store_model(session, settings, tmp_path, "seeds", net, [1 / 1023, 1 / 1023])
    image = upload(client, tiff_bytes(np.random.default_rng(2).integers(0, 200, (48, 64)).astype(np.uint8))).json()

    counts = {}
    for min_size in (None, 1000):
        body = {"model_id": model_id, "volume_ids": [image["id"]], "tile": "auto"}
        if min_size is not None:
            body["min_size"] = min_size
        job = client.post(f"{API}/jobs/predict", json=body).json()
        assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
        (volume,) = client.get(f"{API}/jobs/{job['id']}").json()["metrics"]["volumes"]
        counts[min_size] = volume["n_objects"]
    assert counts[None] >= 10 and counts[1000] == 0, counts


def test_predict_job_on_a_3d_volume_keeps_its_voxel_size(client, session, settings, fast, tmp_path) -> None:
    from embedseg_service.core.model.checkpoint import build_network

    model_id = _store_model(session, settings, tmp_path, "tiny3d", build_network(3, 1), [2 / 1023, 1 / 1023, 1 / 1023])
    volume = np.random.default_rng(1).integers(0, 255, (8, 24, 32)).astype(np.uint8)
    image = upload(client, tiff_bytes(volume), axes="ZYX", voxel_size="2.0,0.5,0.5").json()
    job = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": [image["id"]]}).json()
    assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
    labels_id = client.get(f"{API}/jobs/{job['id']}").json()["result"]["labels"][image["id"]]
    labels = client.get(f"{API}/volumes/{labels_id}").json()
    assert labels["shape"] == [8, 24, 32] and labels["axes"] == "ZYX"
    assert labels["voxel_size"] == pytest.approx([2.0, 0.5, 0.5])
    stored = read_tiff(io.BytesIO(client.get(f"{API}/volumes/{labels_id}/download").content))
    assert stored.voxel_size == pytest.approx((2.0, 0.5, 0.5))


# --------------------------------------------------------------------------- defaults


def test_predict_job_segments_with_tta_unless_asked_off(client, fast, tiny_model, monkeypatch) -> None:
    from embedseg_service.core.model.checkpoint import TrainedModel

    asked: list[bool] = []
    segment_batch = TrainedModel.segment_batch

    def recording(self, images, **options):  # type: ignore[no-untyped-def]
        asked.append(options["tta"])
        return segment_batch(self, images, **options)

    monkeypatch.setattr(TrainedModel, "segment_batch", recording)
    image = upload(client, tiff_bytes(np.zeros((32, 32), np.uint8))).json()["id"]
    for body, tta in (({}, True), ({"tta": False}, False)):
        job = client.post(f"{API}/jobs/predict", json={"model_id": tiny_model, "volume_ids": [image], **body}).json()
        assert job["spec"]["tta"] is tta
        assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
        assert client.get(f"{API}/jobs/{job['id']}").json()["metrics"]["tta"] is tta
    assert asked == [True, False]


@pytest.mark.parametrize(
    ("shape", "axes", "thresholds"),
    [
        ((48, 64), "YX", [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]),
        ((4, 48, 64), "ZYX", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    ],
)
def test_evaluate_job_without_thresholds_takes_those_of_its_dimensionality(client, fast, shape, axes,
                                                                            thresholds) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    labels = np.broadcast_to(_labels(), shape).copy()
    gt = upload(client, tiff_bytes(labels), kind="labels", axes=axes).json()["id"]
    job = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": gt, "pred_id": gt}]}).json()
    assert job["spec"]["thresholds"] is None
    assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"{API}/jobs/{job['id']}").json()["error"]
    metrics = client.get(f"{API}/jobs/{job['id']}").json()["metrics"]
    assert metrics["ap"]["thresholds"] == pytest.approx(thresholds) and metrics["ap"]["ap"] == [1.0] * 9
    assert metrics["pairs"][0]["thresholds"] == pytest.approx(thresholds)


def test_evaluate_job_without_thresholds_refuses_2d_and_3d_pairs_together(client) -> None:
    flat = upload(client, tiff_bytes(_labels()), kind="labels").json()["id"]
    stack = upload(client, tiff_bytes(np.stack([_labels()] * 4)), kind="labels", axes="ZYX").json()["id"]
    pairs = [{"gt_id": flat, "pred_id": flat}, {"gt_id": stack, "pred_id": stack}]
    response = client.post(f"{API}/jobs/evaluate", json={"pairs": pairs})
    assert response.status_code == 422
    assert response.json() == {"detail": "thresholds: the pairs mix 2D and 3D volumes, whose default IoU thresholds "
                                         "differ; give thresholds, or evaluate them in separate jobs"}  # fmt: skip
    assert client.post(f"{API}/jobs/evaluate", json={"pairs": pairs, "thresholds": [0.5]}).status_code == 202


# --------------------------------------------------------------------------- warnings


def test_training_warns_about_a_model_that_finds_no_objects() -> None:
    from embedseg_service.worker.handlers import training_warnings

    assert training_warnings({"ap": 0.8, "degenerate": False}, 12) == []
    (warning,) = training_warnings({"degenerate": True}, 3)
    assert warning.startswith("the saved model predicted no objects on the validation data after 3 epoch(s)")
    assert "train longer" in warning


def test_prediction_warns_about_a_degenerate_model_and_empty_volumes() -> None:
    from embedseg_service.worker.handlers import prediction_warnings

    assert prediction_warnings({"best": {"degenerate": False}}, []) == []
    assert prediction_warnings(None, []) == []
    degenerate, empty = prediction_warnings({"best": {"degenerate": True}}, ["v1", "v2"])
    assert degenerate.startswith("the model predicted no objects on its validation data when it was trained")
    assert empty.startswith("no objects found in volume(s) v1, v2:")


def test_predict_job_with_a_degenerate_model_carries_the_warnings(client, session, fast, tiny_model) -> None:
    model = session.get(Model, tiny_model)
    model.metrics = {"best": {"degenerate": True}}
    session.commit()
    image = upload(client, tiff_bytes(np.zeros((40, 56), np.uint8)), name="blank").json()["id"]
    job = client.post(f"{API}/jobs/predict", json={"model_id": tiny_model, "volume_ids": [image]}).json()
    assert run_job(job["id"], settings=fast) == "succeeded"
    metrics = client.get(f"{API}/jobs/{job['id']}").json()["metrics"]
    warnings = metrics["warnings"]
    assert warnings[0].startswith("the model predicted no objects on its validation data")
    (volume,) = metrics["volumes"]
    assert any(w.startswith(f"no objects found in volume(s) {image}") for w in warnings) == (volume["n_objects"] == 0)


def test_graceful_stops_do_not_count_as_lost_workers(session, fast, evaluate_job) -> None:  # type: ignore[no-untyped-def]
    job_id, _, _ = evaluate_job
    for _ in range(3):  # three scale-downs: the job is stopped and requeued by its worker each time
        attempt = jobs.claim(session, job_id, "stopping")
        assert jobs.requeue_job(session, job_id, attempt=attempt)
    for lost in (1, 2):
        assert jobs.claim(session, job_id, f"dead:{lost}")
        _age_heartbeat(session, job_id, 60)
        assert recover_stale_jobs(fast) == [job_id]
        row = jobs.get_job(session, job_id)
        assert (row.status, row.attempts, row.lost_workers) == ("queued", 3 + lost, lost)
    assert jobs.claim(session, job_id, "dead:3")
    _age_heartbeat(session, job_id, 60)
    assert recover_stale_jobs(fast) == []
    row = jobs.get_job(session, job_id)
    assert row.status == "failed" and row.error.startswith("the worker running this job was lost 3 times")
