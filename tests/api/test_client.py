"""The Python client (:mod:`embedseg_service.client`) against the real app in-process, on SQLite and
PostgreSQL, and its retries against a fake transport."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from helpers import RecordingDispatcher, tiff_bytes

from embedseg_service.client import (
    ApiError,
    Client,
    ConnectionFailed,
    JobFailed,
    NotFound,
    Unauthorized,
    WaitInterrupted,
    WaitTimeout,
)
from embedseg_service.client import client as client_module
from embedseg_service.client.retries import RetryPolicy, retry_after
from embedseg_service.core.data.io import read_tiff
from embedseg_service.records import jobs
from embedseg_service.records.keys import create_key
from embedseg_service.records.orm import JobStatus, Model

BASE = "http://testserver"


class Sleeps:
    """A ``sleep`` that records the delays asked for, moves its ``clock`` on by them, and runs ``then``
    (if set) on each."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.now = 0.0
        self.then = lambda: None

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds
        self.then()

    def clock(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def api(app, client, sleeps) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    app.state.dispatcher = RecordingDispatcher()
    with Client(BASE, api_key="", http=client, sleep=sleeps) as session:
        yield session


def _labels() -> np.ndarray:
    mask = np.zeros((32, 48), np.uint16)
    mask[4:10, 4:10] = 1
    mask[20:28, 30:40] = 2
    return mask


def _model_row(app, session) -> Model:  # type: ignore[no-untyped-def]
    """A 2D model row with a stored file (``b"weights"``)."""
    app.state.storage.put("models/client-test.pt", [b"weights"])
    model = Model(
        name="nuclei",
        spatial_dims=2,
        config={"in_channels": 1, "spatial_dims": 2},
        storage_key="models/client-test.pt",
        size_bytes=7,
    )
    session.add(model)
    session.commit()
    return model


def _finish(app, job_id: str, status: JobStatus, **fields) -> None:  # type: ignore[no-untyped-def]
    with app.state.sessionmaker() as other:
        assert jobs.claim(other, job_id, "test-worker") == 1
        assert jobs.finish_job(other, job_id, status, **fields)


# --------------------------------------------------------------------------- volumes


def test_upload_an_image_array_and_its_labels(api) -> None:
    image = api.upload(np.arange(32 * 48, dtype=np.uint16).reshape(32, 48), name="cells", voxel_size=[0.5, 0.25])
    assert (image.name, image.kind.value, image.shape, image.axes) == ("cells", "image", [32, 48], "YX")
    assert image.dtype == "uint16" and image.voxel_size == [0.5, 0.25]
    labels = api.upload(_labels(), kind="labels", image_id=image)
    assert (labels.name, labels.kind.value, labels.image_volume_id) == ("array", "labels", image.id)
    volume = np.zeros((3, 16, 16), np.float32)
    volume[1, 4:8, 4:8] = 1.5
    stack = api.upload(volume, voxel_size="2,0.5,0.5")
    assert (stack.shape, stack.axes, stack.voxel_size) == ([3, 16, 16], "ZYX", [2.0, 0.5, 0.5])
    assert api.volume(stack.id) == stack


def test_upload_a_file_a_folder_and_a_pattern(api, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.tif", "a.tiff", "c.TIF"):
        (folder / name).write_bytes(tiff_bytes(np.full((8, 8), 7, np.uint8)))
    (folder / "notes.txt").write_text("not an image")
    one = api.upload(folder / "b.tif", axes="YX", voxel_size=(0.5, 0.5))
    assert (one.name, one.shape, one.voxel_size) == ("b", [8, 8], [0.5, 0.5])
    assert [v.name for v in api.upload_many(folder)] == ["a", "b", "c"]
    assert [v.name for v in api.upload_many(str(folder / "[ab]*"))] == ["a", "b"]
    assert [v.name for v in api.upload_many([folder / "c.TIF", folder / "a.tiff"])] == ["c", "a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .tif or .tiff file"):
        api.upload_many(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no file matches the pattern"):
        api.upload_many(str(folder / "*.png"))
    with pytest.raises(FileNotFoundError, match="use upload_many for a folder"):
        api.upload(folder)
    with pytest.raises(ValueError, match="3 files but 1 image_ids"):
        api.upload_many(folder, kind="labels", image_ids=[one])


def test_volumes_iterates_every_page_and_filters_by_kind(api, monkeypatch) -> None:
    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)
    images = [api.upload(np.full((8, 8), i, np.uint8), name=f"img{i}") for i in range(3)]
    labels = api.upload(_labels(), kind="labels")
    assert {v.id for v in api.volumes()} == {*(v.id for v in images), labels.id}
    assert [v.id for v in api.volumes(kind="image")] == [v.id for v in reversed(images)]
    assert [v.id for v in api.volumes(kind="labels")] == [labels.id]


def test_download_labels_round_trip(api, tmp_path) -> None:
    tmp_path = tmp_path / "downloads"
    tmp_path.mkdir()
    mask = _labels()
    volume = api.upload(mask, kind="labels", name="t012-labels", voxel_size=[0.5, 0.25])
    array = api.download_labels(volume)
    assert array.dtype == np.uint16 and np.array_equal(array, mask)
    assert np.array_equal(api.download_labels(volume.id, tmp_path / "out" / "mask.tif"), mask)
    stored = read_tiff(tmp_path / "out" / "mask.tif")
    assert np.array_equal(stored.data, mask) and stored.voxel_size == pytest.approx((0.5, 0.25))
    written = api.download(volume, tmp_path)
    assert written == tmp_path / "t012-labels.tif"
    assert np.array_equal(tifffile.imread(written), mask)
    assert api.download(volume, tmp_path / "named.tif") == tmp_path / "named.tif"
    assert api.download(volume, f"{tmp_path}/new/") == tmp_path / "new" / "t012-labels.tif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.tif", "new", "out", "t012-labels.tif"]


def test_errors_carry_the_server_detail(api, tmp_path, sleeps) -> None:
    with pytest.raises(NotFound) as missing:
        api.job("nope")
    assert (missing.value.status, missing.value.detail) == (404, "Job nope not found")
    with pytest.raises(NotFound, match="Volume gone not found"):
        api.download_labels("gone")
    image = api.upload(np.zeros((8, 8), np.uint8))
    with pytest.raises(ApiError) as refused:
        api.train([image], [])
    assert refused.value.status == 422 and "mask_ids" in refused.value.detail
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(ApiError) as not_tiff:
        api.upload(tmp_path / "text.tif")
    assert not_tiff.value.status == 415
    assert not_tiff.value.detail == (
        "the uploaded file is neither a TIFF (no TIFF header) nor a ZIP archive; send a .tif/.tiff file or a zipped "
        "OME-Zarr store (.ome.zarr.zip)"
    )
    assert sleeps.delays == []  # 4xx answers are final


# --------------------------------------------------------------------------- jobs


def test_submit_train_predict_evaluate(api, app, session) -> None:
    image = api.upload(np.zeros((32, 48), np.uint8))
    mask = api.upload(_labels(), kind="labels", image_id=image)
    train = api.train([image], [mask], epochs=3, name="m")
    assert (train.kind.value, train.status.value) == ("train", "queued")
    assert (train.spec["epochs"], train.spec["name"]) == (3, "m")
    model = _model_row(app, session)
    predict = api.predict(model.id, [image], gt_ids=[mask], tta=False, tile=(32, 32))
    assert predict.spec["tta"] is False and predict.spec["tile"] == [32, 32] and predict.spec["gt_ids"] == [mask.id]
    defaulted = api.predict(model, [image])
    assert defaulted.spec["tta"] is True  # the server's default
    evaluate = api.evaluate([(mask, mask)], thresholds=[0.5])
    assert evaluate.spec["pairs"] == [{"gt_id": mask.id, "pred_id": mask.id}] and evaluate.spec["thresholds"] == [0.5]
    assert app.state.dispatcher.submitted == [train.id, predict.id, defaulted.id, evaluate.id]
    assert {j.id for j in api.jobs(kind="predict")} == {predict.id, defaulted.id}
    assert [j.id for j in api.jobs(status="queued", kind="train")] == [train.id]
    assert api.job(train) == train


def test_callback_url_reaches_the_server(api) -> None:
    """Each submit sends ``callback_url``; this server has no webhook secret, so it refuses it, saying why."""
    mask = api.upload(_labels(), kind="labels")
    hook = "https://example.org/hook"
    for submit in (
        lambda: api.evaluate([(mask, mask)], callback_url=hook),
        lambda: api.predict("some-model", [mask], callback_url=hook),
        lambda: api.train([mask], [mask], callback_url=hook),
    ):
        with pytest.raises(ApiError) as refused:
            submit()
        assert refused.value.status == 422
        assert refused.value.detail == (
            "callback_url: this server has no webhook secret to sign deliveries with (EMBEDSEG_WEBHOOK_SECRET "
            "is unset); ask its operator to set one, or leave callback_url out"
        )


def test_one_idempotency_key_submits_once(api, app) -> None:
    image = api.upload(np.zeros((32, 48), np.uint8))
    mask = api.upload(_labels(), kind="labels")
    first = api.train([image], [mask], idempotency_key="run-42")
    again = api.train([image], [mask], idempotency_key="run-42")
    assert again.id == first.id and app.state.dispatcher.submitted == [first.id]
    other = api.train([image], [mask])
    assert other.id != first.id  # each call without a key gets a new one


def test_wait_returns_a_succeeded_job_and_resumes(api, app, session, sleeps) -> None:
    model = _model_row(app, session)
    image = api.upload(np.zeros((32, 48), np.uint8))
    job = api.predict(model, [image])
    sleeps.then = lambda: _finish(app, job.id, JobStatus.succeeded, result={"label_volume_ids": []})
    done = api.wait(job, poll_s=3.0, progress=False)
    assert done.status is JobStatus.succeeded and done.result == {"label_volume_ids": []}
    assert sleeps.delays == [0.05]  # the first polls come sooner than poll_s
    assert api.wait(job.id) == done and sleeps.delays == [0.05]  # a finished job answers at once


def test_wait_raises_job_failed_with_the_job(api, app, session) -> None:
    model = _model_row(app, session)
    image = api.upload(np.zeros((32, 48), np.uint8))
    failed = api.predict(model, [image])
    _finish(app, failed.id, JobStatus.failed, error="out of memory")
    with pytest.raises(JobFailed, match="ended failed: out of memory") as caught:
        api.wait(failed)
    assert caught.value.job.id == failed.id and caught.value.job.error == "out of memory"
    cancelled = api.predict(model, [image])
    _finish(app, cancelled.id, JobStatus.cancelled)
    with pytest.raises(JobFailed, match="ended cancelled"):
        api.wait(cancelled)


def test_wait_times_out_and_can_wait_again(api, app, session) -> None:
    model = _model_row(app, session)
    job = api.predict(model, [api.upload(np.zeros((32, 48), np.uint8))])
    with pytest.raises(WaitTimeout, match="still queued after 0 s") as caught:
        api.wait(job, timeout=0)
    assert caught.value.job.id == job.id
    _finish(app, job.id, JobStatus.succeeded)
    assert api.wait(job, timeout=0).status is JobStatus.succeeded


def test_wait_draws_a_progress_bar_when_asked(api, app, session, sleeps, capsys) -> None:
    model = _model_row(app, session)
    job = api.predict(model, [api.upload(np.zeros((32, 48), np.uint8))])
    sleeps.then = lambda: _finish(app, job.id, JobStatus.succeeded)
    api.wait(job, progress=True)
    assert "100%" in capsys.readouterr().err
    api.wait(job, progress=False)
    api.wait(job)  # standard error is not a terminal here: quiet
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- models and keys


def test_models_model_and_download(api, app, session, tmp_path) -> None:
    tmp_path = tmp_path / "downloads"
    tmp_path.mkdir()
    model = _model_row(app, session)
    assert [m.id for m in api.models()] == [model.id]
    assert api.model(model.id).name == "nuclei"
    assert api.download_model(model, tmp_path) == tmp_path / "nuclei.pt"
    assert (tmp_path / "nuclei.pt").read_bytes() == b"weights"
    with pytest.raises(NotFound, match="Model nope not found"):
        api.model("nope")


def test_a_key_is_needed_once_one_exists(client, session, monkeypatch) -> None:
    secret = create_key(session, "lab-a").secret
    monkeypatch.delenv("EMBEDSEG_API_KEY", raising=False)
    with pytest.raises(Unauthorized) as refused:
        list(Client(BASE, http=client).volumes())
    assert refused.value.status == 401 and refused.value.detail
    with pytest.raises(Unauthorized):
        Client(BASE, api_key="esk_wrong", http=client).job("x")
    assert list(Client(BASE, api_key=secret, http=client).volumes()) == []
    monkeypatch.setenv("EMBEDSEG_API_KEY", secret)
    from_env = Client(BASE + "/api/v1/", http=client)
    assert from_env.upload(np.zeros((8, 8), np.uint8)).owner == "lab-a"


# --------------------------------------------------------------------------- retries (fake transport)


def _fake(
    answers: list[httpx.Response | Exception], seen: list[httpx.Request], sleeps: Sleeps, **options: Any
) -> Client:
    """A client whose transport answers ``answers`` in turn, recording each request; its clock is that of ``sleeps``."""

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = httpx.MockTransport(handle)
    return Client(
        BASE, api_key="k", http=httpx.Client(transport=transport), sleep=sleeps, clock=sleeps.clock, **options
    )


JOB = {
    "id": "j1",
    "kind": "train",
    "status": "queued",
    "progress": 0.0,
    "spec": {},
    "cancel_requested": False,
    "attempts": 0,
    "created_at": "2024-01-01T00:00:00Z",
}


def test_5xx_and_connection_errors_are_retried_with_backoff(sleeps) -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.Response(503, json={"detail": "database unavailable"}),
        httpx.ConnectError("refused"),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json=JOB),
    ]
    assert _fake(answers, seen, sleeps).job("j1").id == "j1"
    assert sleeps.delays == [0.5, 1.0, 2.0]
    assert len(seen) == 4 and all(r.headers["authorization"] == "Bearer k" for r in seen)


def test_429_honours_retry_after_and_the_idempotency_key_is_kept(sleeps) -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "too many queued jobs"}),
        httpx.ReadTimeout("slow"),
        httpx.Response(409, headers={"Retry-After": "1"}, json={"detail": "still being handled"}),
        httpx.Response(202, json=JOB),
    ]
    job = _fake(answers, seen, sleeps).train(["a"], ["b"], epochs=2)
    assert job.id == "j1"
    assert sleeps.delays == [7.0, 1.0, 1.0]
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(keys) == 1 and len(next(iter(keys))) == 36  # one UUID for every resend of the call
    assert {r.content for r in seen} == {b'{"image_ids":["a"],"mask_ids":["b"],"epochs":2}'}


def test_an_upload_resends_its_file_under_one_key(sleeps, tmp_path) -> None:
    seen: list[httpx.Request] = []
    volume = {
        "id": "v1", "name": "a", "kind": "image", "shape": [8, 8], "dtype": "uint8", "axes": "YX",
        "sha256": "0" * 64, "size_bytes": 1, "created_at": "2024-01-01T00:00:00Z",
    }  # fmt: skip
    answers: list[httpx.Response | Exception] = [httpx.Response(500), httpx.Response(201, json=volume)]
    (tmp_path / "a.tif").write_bytes(content := tiff_bytes(np.zeros((8, 8), np.uint8)))
    assert _fake(answers, seen, sleeps).upload(tmp_path / "a.tif", kind="image").id == "v1"
    assert len(seen) == 2 and all(content in r.content for r in seen)
    assert seen[0].headers["idempotency-key"] == seen[1].headers["idempotency-key"]


def test_other_4xx_are_not_retried(sleeps) -> None:
    for status in (400, 403, 409, 413, 422):
        seen: list[httpx.Request] = []
        answers: list[httpx.Response | Exception] = [httpx.Response(status, json={"detail": f"no ({status})"})]
        with pytest.raises(ApiError) as refused:
            _fake(answers, seen, sleeps).job("j1")
        assert (refused.value.status, refused.value.detail, len(seen)) == (status, f"no ({status})", 1)
    assert sleeps.delays == []


def test_a_dropped_connection_mid_wait_recovers(sleeps) -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.Response(200, json={**JOB, "status": "running", "progress": 0.5}),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.Response(200, json={**JOB, "status": "succeeded", "progress": 1.0, "result": {"model_id": "m1"}}),
    ]
    done = _fake(answers, seen, sleeps).wait("j1", poll_s=4.0, progress=False)
    assert done.result == {"model_id": "m1"} and sleeps.delays == [0.05, 0.5] and len(seen) == 3


def test_wait_polls_soon_at_first_then_every_poll_s(sleeps) -> None:
    seen: list[httpx.Request] = []
    running = httpx.Response(200, json={**JOB, "status": "running", "progress": 0.5})
    answers: list[httpx.Response | Exception] = [running] * 6
    answers.append(httpx.Response(200, json={**JOB, "status": "succeeded", "progress": 1.0}))
    _fake(answers, seen, sleeps).wait("j1", poll_s=0.3, progress=False)
    assert sleeps.delays == pytest.approx([0.05, 0.075, 0.1125, 0.16875, 0.253125, 0.3]) and len(seen) == 7


def test_retries_run_out(sleeps) -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [httpx.Response(503, json={"detail": "down"})] * 6
    with pytest.raises(ApiError, match="503: down"):
        _fake(answers, seen, sleeps).job("j1")
    assert len(seen) == 6 and sleeps.delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    broken: list[httpx.Response | Exception] = [httpx.ConnectError("refused")] * 6
    with pytest.raises(ConnectionFailed, match=r"refused \(after 5 retries over 15.5 s\); check that the server is up"):
        _fake(broken, [], sleeps).job("j1")


def test_a_retry_deadline_bounds_the_resends_in_time(sleeps) -> None:
    broken: list[httpx.Response | Exception] = [httpx.ConnectError("refused")] * 20
    with pytest.raises(ConnectionFailed, match=r"refused \(after 5 retries over 10.0 s\)"):
        _fake(broken, [], sleeps, retries=None, retry_deadline=10.0).job("j1")
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 2.5]  # the last wait ends at the deadline
    seen: list[httpx.Request] = []
    sleeps.delays.clear()
    answers: list[httpx.Response | Exception] = [
        httpx.Response(503, json={"detail": "restarting"}),
        httpx.Response(429, headers={"Retry-After": "600"}, json={"detail": "too many queued jobs"}),
        httpx.Response(503, headers={"Retry-After": "120"}, json={"detail": "restarting"}),
    ]
    with pytest.raises(ApiError, match="429: too many queued jobs"):  # its Retry-After ends past the deadline
        _fake(answers, seen, sleeps, retries=None, retry_deadline=20.0).job("j1")
    assert sleeps.delays == [0.5] and len(seen) == 2
    slow_down = httpx.Response(503, headers={"Retry-After": "120"})
    assert RetryPolicy(max_backoff=30.0).delay(0, slow_down) == 30.0  # a Retry-After is capped as the backoff is
    with pytest.raises(ValueError, match="retries=None alone would resend forever"):
        RetryPolicy(retries=None)
    assert RetryPolicy(deadline=5.0).within(9.0).deadline == 5.0 and RetryPolicy().within(2.0).deadline == 2.0


def test_a_wait_that_loses_the_server_says_so_and_stops_at_its_timeout(sleeps) -> None:
    running = httpx.Response(200, json={**JOB, "status": "running", "progress": 0.25})
    answers: list[httpx.Response | Exception] = [running, *[httpx.ConnectError("refused") for _ in range(10)]]
    with pytest.raises(WaitInterrupted) as lost:
        _fake(answers, [], sleeps).wait("j1", poll_s=1.0, timeout=5.0, progress=False)
    assert sleeps.delays == pytest.approx([0.05, 0.5, 1.0, 2.0, 1.45])  # the poll's retries end with the wait's timeout
    assert isinstance(lost.value, ConnectionFailed) and lost.value.job.status is JobStatus.running
    assert str(lost.value).startswith("lost the server while waiting for job j1, last seen running at 25% (GET ")
    assert str(lost.value).endswith("the job may still run: wait on it again to resume")


def test_retry_after_as_a_date_and_the_backoff_cap() -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < (retry_after(httpx.Response(503, headers={"Retry-After": later})) or 0) <= 30
    assert retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert RetryPolicy(backoff=1.0, max_backoff=5.0).delay(10) == 5.0
    with pytest.raises(ValueError, match="must be >= 0"):
        RetryPolicy(retries=-1)


def test_download_labels_decodes_the_tiff(sleeps) -> None:
    mask = _labels()
    answers: list[httpx.Response | Exception] = [httpx.Response(200, content=tiff_bytes(mask))]
    array = _fake(answers, [], sleeps).download_labels("v1")
    assert np.array_equal(array, mask)
    assert np.array_equal(tifffile.imread(io.BytesIO(tiff_bytes(mask))), array)
