"""Fencing by the claim's attempt, files of finished jobs, leftovers of dead processes, the reconciler and
``/ready``'s queue check, on SQLite and PostgreSQL (the broker parts on the real Redis).

A worker's writes name the attempt number its claim got; once another worker took the job over,
they change nothing and raise, outputs are written under the attempt's folder and registered only
by the attempt that still owns the job, and a finished job keeps only the files it registered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from helpers import REDIS_URL, service_missing
from sqlalchemy import update

from embedseg_service.api.dispatch import CeleryDispatcher
from embedseg_service.records import jobs
from embedseg_service.records.broker import message_job_id, unsent_jobs, waiting_job_ids
from embedseg_service.records.orm import Job, JobKind, JobStatus, Volume, VolumeKind, utcnow
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import PROCESS_STARTED, TEMP_DIR, LocalStorage, checkpoint_key
from embedseg_service.worker.cleanup import SCRATCH_PREFIX, clean_scratch
from embedseg_service.worker.context import JobContext, JobOutcome
from embedseg_service.worker.reconcile import Reconciler
from embedseg_service.worker.runner import run_job

API = "/api/v1"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"progress_throttle_s": 0.05, "heartbeat_s": 0.2})


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.storage_path)


def _job(session) -> str:  # type: ignore[no-untyped-def]
    return jobs.create_job(session, JobKind.evaluate, {}).id


def _handlers(handler: Callable[[JobContext], JobOutcome]) -> dict[JobKind, Callable[[JobContext], JobOutcome]]:
    return dict.fromkeys(JobKind, handler)


def _labels_row(key: str, sha256: str, size: int) -> Volume:
    return Volume(
        name="out",
        kind=VolumeKind.labels.value,
        sha256=sha256,
        shape=[2, 2],
        dtype="uint16",
        axes="YX",
        size_bytes=size,
        storage_key=key,
    )


# --------------------------------------------------------------------------- fencing


def test_writes_are_fenced_by_the_claims_attempt(session) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session)
    assert jobs.claim(session, job_id, "w1:1") == 1
    assert jobs.update_progress(session, job_id, progress=0.2, stage="epoch 1", attempt=1) is False
    assert jobs.heartbeat(session, job_id, attempt=1) is False
    # w1 stops beating; the job is requeued and another worker claims it
    assert jobs.requeue_job(session, job_id, attempt=1)
    assert jobs.claim(session, job_id, "w2:2") == 2

    with pytest.raises(jobs.ClaimLost, match=f"job {job_id} is no longer running under attempt 1"):
        jobs.update_progress(session, job_id, progress=0.9, stage="late", attempt=1)
    with pytest.raises(jobs.ClaimLost):
        jobs.heartbeat(session, job_id, attempt=1)
    assert not jobs.requeue_job(session, job_id, attempt=1)
    late = _labels_row(f"jobs/{job_id}/a1/labels.tif", "0" * 64, 1)
    assert not jobs.finish_job(session, job_id, JobStatus.succeeded, outputs=[late], attempt=1)
    assert not jobs.holds_claim(session, job_id, 1) and jobs.holds_claim(session, job_id, 2)
    row = jobs.get_job(session, job_id)
    assert (row.status, row.worker, row.attempts, row.stage) == ("running", "w2:2", 2, "starting")
    assert session.query(Volume).count() == 0

    assert jobs.finish_job(session, job_id, JobStatus.succeeded, attempt=2)
    assert not jobs.holds_claim(session, job_id, 2)
    with pytest.raises(jobs.ClaimLost):
        jobs.update_progress(session, job_id, progress=0.5, attempt=2)


def test_a_worker_that_lost_its_claim_stops_registers_nothing_and_removes_its_files(session, fast, storage) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session)
    written: list[str] = []

    def overtaken(context: JobContext) -> JobOutcome:
        written.append(storage.put(context.output_key("labels-1.tif"), [b"first"]).key)
        with context.sessions() as other:  # the heartbeat went stale and another worker took the job over
            assert jobs.requeue_job(other, job_id, attempt=context.attempt)
            assert jobs.claim(other, job_id, "w2:2") == 2
        context.reporter.update(progress=0.5, stage="step 2", force=True)
        raise AssertionError("the reporter did not stop the job")

    assert run_job(job_id, settings=fast, handlers=_handlers(overtaken), name="w1:1") == "lost"
    assert written == [f"jobs/{job_id}/a1/labels-1.tif"]
    assert storage.list_keys(f"jobs/{job_id}") == []
    row = jobs.get_job(session, job_id)
    assert (row.status, row.worker, row.attempts, row.progress) == ("running", "w2:2", 2, 0.0)


def test_an_output_is_not_written_once_the_claim_is_lost(session, fast, storage) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session)

    def overtaken(context: JobContext) -> JobOutcome:
        with context.sessions() as other:
            jobs.requeue_job(other, job_id, attempt=context.attempt)
            jobs.claim(other, job_id, "w2:2")
        context.reporter.check_claim()
        storage.put(context.output_key("model.pt"), [b"late"])
        raise AssertionError("check_claim did not see the lost claim")

    assert run_job(job_id, settings=fast, handlers=_handlers(overtaken)) == "lost"
    assert storage.list_keys(f"jobs/{job_id}") == []


# --------------------------------------------------------------------------- files of finished jobs


@pytest.mark.parametrize("ending", ["failed", "cancelled"])
def test_a_failed_or_cancelled_job_leaves_no_files(session, fast, storage, ending) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session)

    def ends(context: JobContext) -> JobOutcome:
        storage.put(context.output_key("labels-1.tif"), [b"partial"])
        storage.put(checkpoint_key(job_id, context.attempt or 1), [b"state"])
        if ending == "cancelled":
            with context.sessions() as other:
                jobs.request_cancel(other, job_id)
            context.reporter.raise_if_cancelled(poll=True)
        raise ValueError("the volume has no objects")

    assert run_job(job_id, settings=fast, handlers=_handlers(ends)) == ending
    assert storage.list_keys(f"jobs/{job_id}") == []
    assert not (storage.root / "jobs" / job_id).exists()


def test_a_succeeded_job_keeps_only_its_registered_outputs(session, fast, storage) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session)
    assert jobs.claim(session, job_id, "lost:1") == 1  # an earlier attempt left a file and a checkpoint
    storage.put(f"jobs/{job_id}/a1/labels-1.tif", [b"old"])
    storage.put(checkpoint_key(job_id, 1), [b"old state"])
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    session.commit()

    def produce(context: JobContext) -> JobOutcome:
        assert context.attempt == 2
        storage.put(checkpoint_key(job_id, 2), [b"state"])
        storage.put(context.output_key("scratch-copy.tif"), [b"unregistered"])
        written = storage.put(context.output_key("labels-1.tif"), [b"labels"])
        return JobOutcome(result={}, outputs=[_labels_row(written.key, written.sha256, written.size)])

    assert run_job(job_id, settings=fast, handlers=_handlers(produce), name="second:2") == "succeeded"
    assert storage.list_keys(f"jobs/{job_id}") == [f"jobs/{job_id}/a2/labels-1.tif"]
    assert storage.path_for(f"jobs/{job_id}/a2/labels-1.tif").read_bytes() == b"labels"


def test_the_reconciler_requeues_lost_workers_jobs_and_purges_what_finished_jobs_left(session, fast, storage) -> None:  # type: ignore[no-untyped-def]
    lost, cancelled = _job(session), _job(session)
    assert jobs.claim(session, lost, "dead:1") == 1
    session.execute(update(Job).where(Job.id == lost).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    session.commit()
    assert jobs.claim(session, cancelled, "w:1") == 1
    assert jobs.requeue_job(session, cancelled, attempt=1)  # stopped by a shutdown, its checkpoint kept
    storage.put(checkpoint_key(cancelled, 1), [b"state"])
    jobs.request_cancel(session, cancelled)  # then cancelled while queued, by the API

    done = Reconciler(fast, None, storage=storage).run_once()
    assert done.requeued == [lost] and done.resent == [] and done.files_removed == 1
    assert storage.list_keys(f"jobs/{cancelled}") == []
    assert jobs.get_job(session, lost).status == "queued"


# --------------------------------------------------------------------------- leftovers of dead processes


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_temporary_files_of_dead_writers_are_removed_at_start(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    temp = storage.root / TEMP_DIR
    temp.mkdir(parents=True)
    host, me, dead, parent = socket.gethostname(), os.getpid(), _dead_pid(), os.getppid()
    names = {
        "mine-now": f"{host}@{me}@a.part",
        "mine-before-start": f"{host}@{me}@b.part",
        "dead": f"{host}@{dead}@c.part",
        "dead-rewrite": f"{host}@{dead}@d.canonical.tif",
        "alive": f"{host}@{parent}@e.part",
        "other-host": f"elsewhere@{dead}@f.part",
        "other-host-old": f"elsewhere@{dead}@g.part",
        "untagged-old": "h.part",
    }
    for name in names.values():
        (temp / name).write_bytes(b"x")
    old = time.time() - 7200
    for key in ("other-host-old", "untagged-old"):
        os.utime(temp / names[key], (old, old))
    os.utime(temp / names["mine-before-start"], (PROCESS_STARTED - 10, PROCESS_STARTED - 10))
    assert storage.clean_temp(older_than_s=3600) == 5
    assert sorted(p.name for p in temp.iterdir()) == sorted(names[k] for k in ("mine-now", "alive", "other-host"))
    assert storage.clean_temp() == 3  # nothing else writes: everything goes


def test_scratch_folders_of_dead_processes_are_removed_at_start(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = tmp_path / f"{SCRATCH_PREFIX}{host}@{_dead_pid()}@abc"
    mine = tmp_path / f"{SCRATCH_PREFIX}{host}@{os.getpid()}@def"
    other = tmp_path / f"{SCRATCH_PREFIX}elsewhere@1@ghi"
    for folder in (dead, mine, other):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.last.pt").write_bytes(b"x")
    assert clean_scratch(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


# --------------------------------------------------------------------------- broker and /ready (real Redis)


@pytest.fixture
def broker_settings(fast: Settings) -> Iterator[Settings]:
    """``fast`` with the real Redis (test database 15) as broker, on a queue of this test's own."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        service_missing("Redis is not reachable at 127.0.0.1:6379")
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    try:
        yield fast.model_copy(update={"broker_url": REDIS_URL, "gpu_queue": queue, "requeue_after_s": 60.0})
    finally:
        client.delete(queue)
        client.close()


def _age(session, job_id: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    session.execute(update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(seconds=seconds)))
    session.commit()


@pytest.mark.redis
def test_queued_jobs_without_a_broker_message_are_reported_and_sent_again(
    app, client, session, broker_settings
) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = broker_settings
    waiting, lost, fresh = _job(session), _job(session), _job(session)
    for job_id in (waiting, lost):
        _age(session, job_id, 120)
    dispatcher = CeleryDispatcher(broker_settings)
    try:
        dispatcher.submit(waiting)
        assert waiting_job_ids(broker_settings) == {waiting}
        assert unsent_jobs(session, broker_settings) == [lost]  # fresh is younger than requeue_after_s

        response = client.get(f"{API}/ready")
        assert response.status_code == 503
        assert response.json()["detail"] == (
            f"1 queued job(s) (oldest {lost}) waited more than 60 s (EMBEDSEG_REQUEUE_AFTER_S) with no message in "
            f"the broker queue {broker_settings.gpu_queue!r}: the queue and the database disagree; a running worker "
            "sends them again within 0.2 s, so start a worker ('embedseg worker') if none runs"
        )

        done = Reconciler(broker_settings, dispatcher.submit).run_once()
        assert done.resent == [lost] and done.requeued == []
        assert waiting_job_ids(broker_settings) == {waiting, lost}
        assert Reconciler(broker_settings, dispatcher.submit).run_once().resent == []  # nothing sent twice
        assert client.get(f"{API}/ready").status_code == 200
        assert fresh not in waiting_job_ids(broker_settings)
    finally:
        dispatcher.close()


def test_message_job_id_reads_the_task_message_and_ignores_others() -> None:
    import base64
    import json

    body = base64.b64encode(json.dumps([["job-1"], {}, {}]).encode()).decode()
    message = {"body": body, "headers": {"task": "embedseg.run_job"}, "properties": {"body_encoding": "base64"}}
    assert message_job_id(json.dumps(message), "embedseg.run_job") == "job-1"
    assert message_job_id(json.dumps(message), "other.task") is None
    assert message_job_id(b"not json", "embedseg.run_job") is None


def test_requeue_after_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="requeue_after_s must be > 0, got 0.0"):
        Settings(_env_file=None, requeue_after_s=0)
    assert Settings(_env_file=None).requeue_after_s == 300.0
