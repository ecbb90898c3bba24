"""Job state machine on SQLite and PostgreSQL: compare-and-set claims, progress, cancel, finish."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from embedseg_service.records import jobs
from embedseg_service.records.db import make_engine, make_sessionmaker
from embedseg_service.records.orm import Job, JobStatus, JobVolume, Model, Volume, utcnow


@pytest.fixture
def make_session(database_url):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def db(make_session):  # type: ignore[no-untyped-def]
    with make_session() as session:
        yield session


def volume(db, name: str = "v", kind: str = "image") -> Volume:  # type: ignore[no-untyped-def]
    row = Volume(
        name=name,
        kind=kind,
        sha256="0" * 64,
        shape=[8, 8],
        dtype="uint16",
        axes="YX",
        size_bytes=1,
        storage_key=f"volumes/{name}.tif",
    )
    db.add(row)
    db.commit()
    return row


def test_create_job_is_queued_with_links(db) -> None:  # type: ignore[no-untyped-def]
    image, mask = volume(db, "i"), volume(db, "m", "labels")
    job = jobs.create_job(
        db, "train", {"epochs": 3}, owner=None, volumes=[(image.id, "image"), (mask.id, "mask"), (image.id, "image")]
    )
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.kind, fresh.progress, fresh.attempts, fresh.cancel_requested) == (
        "queued",
        "train",
        0.0,
        0,
        False,
    )
    assert fresh.spec == {"epochs": 3}
    assert fresh.created_at.tzinfo is not None
    links = sorted((link.volume_id, link.role) for link in db.query(JobVolume).filter_by(job_id=job.id))
    assert links == sorted([(image.id, "image"), (mask.id, "mask")])
    assert jobs.active_jobs_using_volume(db, image.id) == [job.id]


def test_unknown_kind_and_job(db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown job kind 'segment'; valid: train, predict, evaluate"):
        jobs.create_job(db, "segment", {})
    with pytest.raises(jobs.JobNotFound, match="Job nope not found"):
        jobs.claim_job(db, "nope", "w")
    with pytest.raises(jobs.JobNotFound):
        jobs.request_cancel(db, "nope")
    with pytest.raises(jobs.JobNotFound):
        jobs.finish_job(db, "nope", "failed")


def test_claim_is_compare_and_set(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "predict", {"model_id": "m"})
    assert jobs.claim_job(db, job.id, "worker-a") is True
    assert jobs.claim_job(db, job.id, "worker-b") is False  # a redelivered message loses
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.worker, fresh.attempts, fresh.stage) == ("running", "worker-a", 1, "starting")
    assert fresh.started_at is not None and fresh.heartbeat_at is not None
    assert jobs.finish_job(db, job.id, JobStatus.succeeded, result={"volume_ids": []})
    assert jobs.claim_job(db, job.id, "worker-c") is False  # a finished job never runs again


def test_concurrent_claims_have_one_winner(make_session) -> None:  # type: ignore[no-untyped-def]
    with make_session() as session:
        job_id = jobs.create_job(session, "evaluate", {}).id
    barrier = threading.Barrier(4)
    wins: list[bool] = []

    def claim(name: str) -> None:
        with make_session() as session:
            barrier.wait()
            wins.append(jobs.claim_job(session, job_id, name))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False, False, False, True]


def test_progress_only_on_running_jobs(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "train", {})
    assert jobs.update_progress(db, job.id, progress=0.5) is False
    assert jobs.get_job(db, job.id).progress == 0.0  # not running: nothing written
    jobs.claim_job(db, job.id, "w")
    metrics = {"epochs": [{"epoch": 1, "train_loss": 0.9, "val_iou": 0.4}]}
    assert jobs.update_progress(db, job.id, progress=0.25, stage="epoch 1/4", eta_s=30.0, metrics=metrics) is False
    fresh = jobs.get_job(db, job.id)
    assert (fresh.progress, fresh.stage, fresh.eta_s, fresh.metrics) == (0.25, "epoch 1/4", 30.0, metrics)
    assert jobs.update_progress(db, job.id, progress=0.5) is False
    assert jobs.get_job(db, job.id).stage == "epoch 1/4"  # untouched fields stay
    with pytest.raises(ValueError, match=r"progress must be within \[0, 1\], got 1.5"):
        jobs.update_progress(db, job.id, progress=1.5)


def test_cancel_queued_job_is_immediate(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "train", {})
    cancelled = jobs.request_cancel(db, job.id)
    assert (cancelled.status, cancelled.stage, cancelled.cancel_requested) == ("cancelled", "cancelled", True)
    assert cancelled.finished_at is not None
    assert jobs.claim_job(db, job.id, "w") is False
    with pytest.raises(jobs.InvalidTransition, match=f"Job {job.id} is cancelled; it cannot become cancelled"):
        jobs.request_cancel(db, job.id)


def test_cancel_running_job_sets_the_flag(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "train", {})
    jobs.claim_job(db, job.id, "w")
    assert jobs.is_cancel_requested(db, job.id) is False
    flagged = jobs.request_cancel(db, job.id)
    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    assert jobs.is_cancel_requested(db, job.id) is True
    assert jobs.update_progress(db, job.id, progress=0.3) is True  # the worker learns at its next step
    assert jobs.finish_job(db, job.id, "cancelled")
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.eta_s) == ("cancelled", None)
    assert jobs.is_cancel_requested(db, "gone") is True


def test_finish_registers_outputs_atomically_and_once(db) -> None:  # type: ignore[no-untyped-def]
    image = volume(db, "img")
    job = jobs.create_job(db, "train", {}, volumes=[(image.id, "image")])
    jobs.claim_job(db, job.id, "w")
    labels = Volume(
        name="pred",
        kind="labels",
        sha256="1" * 64,
        shape=[8, 8],
        dtype="uint16",
        axes="YX",
        size_bytes=1,
        storage_key=f"jobs/{job.id}/labels.tif",
        image_volume_id=image.id,
    )
    model = Model(name="m", spatial_dims=2, config={"dims": 2}, storage_key=f"jobs/{job.id}/model.pt", size_bytes=9)
    assert labels.id and model.id  # ids exist before insertion, for the result
    result = {"model_id": model.id, "volume_ids": [labels.id]}
    assert jobs.finish_job(db, job.id, JobStatus.succeeded, result=result, outputs=[labels, model], metrics={"ap": 0.8})
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.progress, fresh.stage, fresh.result, fresh.metrics) == (
        "succeeded",
        1.0,
        "succeeded",
        result,
        {"ap": 0.8},
    )
    assert db.get(Volume, labels.id).source_job_id == job.id
    assert db.get(Model, model.id).source_job_id == job.id
    assert jobs.active_jobs_using_volume(db, image.id) == []

    # a duplicate run finishing late registers nothing and changes nothing
    late = Volume(
        name="late",
        kind="labels",
        sha256="2" * 64,
        shape=[8, 8],
        dtype="uint16",
        axes="YX",
        size_bytes=1,
        storage_key=f"jobs/{job.id}/late.tif",
    )
    assert jobs.finish_job(db, job.id, "failed", error="boom", outputs=[late]) is False
    assert db.get(Volume, late.id) is None
    assert jobs.get_job(db, job.id).status == "succeeded"


def test_failure_keeps_error_text_and_queued_job_can_fail(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "predict", {})
    assert jobs.finish_job(db, job.id, "failed", error="could not send the job to the broker")
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.error) == ("failed", "could not send the job to the broker")


@pytest.mark.parametrize("status", ["queued", "running", "bogus"])
def test_finish_needs_a_final_status(db, status) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "predict", {})
    with pytest.raises(ValueError):
        jobs.finish_job(db, job.id, status)
    assert jobs.get_job(db, job.id).status == "queued"


def test_requeue_and_stale_jobs(db) -> None:  # type: ignore[no-untyped-def]
    job = jobs.create_job(db, "train", {})
    assert jobs.requeue_job(db, job.id) is False  # only running jobs go back
    jobs.claim_job(db, job.id, "w")
    assert jobs.stale_jobs(db, 60) == []
    later = utcnow() + timedelta(seconds=120)
    assert [j.id for j in jobs.stale_jobs(db, 60, now=later)] == [job.id]
    assert jobs.requeue_job(db, job.id) is True
    fresh = jobs.get_job(db, job.id)
    assert (fresh.status, fresh.worker, fresh.stage) == ("queued", None, "requeued")
    assert jobs.claim_job(db, job.id, "w2") is True
    assert jobs.get_job(db, job.id).attempts == 2


def test_jobs_using_model(db) -> None:  # type: ignore[no-untyped-def]
    first = jobs.create_job(db, "predict", {"model_id": "m1", "volume_ids": []})
    jobs.create_job(db, "predict", {"model_id": "m2", "volume_ids": []})
    done = jobs.create_job(db, "predict", {"model_id": "m1", "volume_ids": []})
    jobs.request_cancel(db, done.id)
    assert jobs.active_jobs_using_model(db, "m1") == [first.id]


def test_transition_table_is_closed() -> None:
    for status in JobStatus:
        assert status in jobs.TRANSITIONS
        if status.terminal:
            assert jobs.TRANSITIONS[status] == frozenset()
    assert Job.__tablename__ == "jobs"


def test_a_claim_waits_while_the_owner_runs_its_quota_of_jobs(db) -> None:  # type: ignore[no-untyped-def]
    a1, a2 = (jobs.create_job(db, "evaluate", {}, owner="lab-a").id for _ in range(2))
    b1 = jobs.create_job(db, "evaluate", {}, owner="lab-b").id
    anonymous = [jobs.create_job(db, "evaluate", {}).id for _ in range(2)]
    assert jobs.claim(db, a1, "w1", max_running=1) == 1
    assert jobs.claim(db, a2, "w2", max_running=1) is None
    assert jobs.get_job(db, a2).status == "queued"
    assert jobs.claim(db, b1, "w2", max_running=1) == 1  # another owner is not held up
    assert jobs.claim(db, anonymous[0], "w3", max_running=1) == 1
    assert jobs.claim(db, anonymous[1], "w3", max_running=1) is None
    assert jobs.claim(db, a2, "w2", max_running=2) == 1  # a larger quota lets it run
    assert jobs.claim(db, anonymous[1], "w3") == 1  # without a quota the claim is unconditional


def test_two_claims_of_one_owner_at_the_same_moment_keep_its_quota(make_session) -> None:  # type: ignore[no-untyped-def]
    """The first claim's transaction stays open (its commit waits) while a second claim, of another job of the
    same owner, starts: the second must wait for the first and then count its job as running."""
    with make_session() as setup:
        first, second = (jobs.create_job(setup, "evaluate", {}, owner="lab-a").id for _ in range(2))
    inside, release = threading.Event(), threading.Event()
    claimed: dict[str, int | None] = {}
    with make_session() as one, make_session() as two:
        commit = one.commit

        def held_commit() -> None:
            inside.set()
            release.wait(30)
            commit()

        one.commit = held_commit  # type: ignore[method-assign]
        threads = [
            threading.Thread(target=lambda: claimed.update(first=jobs.claim(one, first, "w1", max_running=1))),
            threading.Thread(target=lambda: claimed.update(second=jobs.claim(two, second, "w2", max_running=1))),
        ]
        threads[0].start()
        assert inside.wait(30)  # the first claim's UPDATE ran; its transaction is open
        threads[1].start()
        threads[1].join(1.0)
        assert threads[1].is_alive()  # waiting for the first claim's transaction
        release.set()
        for thread in threads:
            thread.join(30)
    assert claimed == {"first": 1, "second": None}
    with make_session() as check:
        assert [jobs.get_job(check, job_id).status for job_id in (first, second)] == ["running", "queued"]


def test_run_job_defers_a_job_whose_owner_is_at_its_quota(db, database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedseg_service.records.settings import Settings
    from embedseg_service.worker.runner import run_job

    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, quota_running_jobs=1)
    first, second = (jobs.create_job(db, "evaluate", {}, owner="lab-a").id for _ in range(2))
    assert jobs.claim(db, first, "elsewhere") == 1
    assert run_job(second, settings=settings, handlers={}) == "deferred"
    assert jobs.get_job(db, second).status == "queued"
