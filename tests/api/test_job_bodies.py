"""``GET /jobs/{id}`` on SQLite and PostgreSQL: the body is ``JobOut`` of the row as it is now (``JobBodies``)."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import sqlite

from embedseg_service.api.deps import JobBodies
from embedseg_service.records import jobs
from embedseg_service.records.jobs import StoredJobReader
from embedseg_service.records.orm import Job, JobStatus
from embedseg_service.records.schemas import JobOut

API = "/api/v1"
SPEC = {"image_ids": ["a"], "mask_ids": ["b"], "dims": 2, "epochs": 3}


def _new_job(session) -> str:  # type: ignore[no-untyped-def]
    return jobs.create_job(session, "train", SPEC).id


def _orm_body(session, job_id: str) -> bytes:  # type: ignore[no-untyped-def]
    """What ``JobOut`` makes of the ORM row, read afresh."""
    session.expire_all()
    return JobOut.model_validate(session.get(Job, job_id)).model_dump_json().encode()


def test_body_is_jobout_of_the_row_byte_for_byte(client, session) -> None:  # type: ignore[no-untyped-def]
    job_id = _new_job(session)
    assert jobs.claim_job(session, job_id, "host:1")
    epochs = [{"epoch": e, "loss": 1.0 / e, "val_iou": None, "val_ap": 0.25 * e} for e in range(1, 4)]
    jobs.update_progress(
        session,
        job_id,
        progress=0.5,
        stage="training epoch 2/3",
        eta_s=12.5,
        metrics={"epochs": epochs, "epochs_total": 3, "note": 'µm, "quoted"'},
    )
    assert jobs.finish_job(session, job_id, JobStatus.failed, error="out of memory", result={"partial": [1, 2]})

    response = client.get(f"{API}/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == _orm_body(session, job_id)
    body = response.json()
    assert body["status"] == "failed" and body["error"] == "out of memory" and body["result"] == {"partial": [1, 2]}
    assert body["metrics"]["epochs"] == epochs and body["metrics"]["note"] == 'µm, "quoted"'
    assert body["created_at"].endswith("Z") and body["attempts"] == 1 and body["cancel_requested"] is False


def test_body_follows_every_change_of_the_row(client, session) -> None:  # type: ignore[no-untyped-def]
    job_id = _new_job(session)
    url = f"{API}/jobs/{job_id}"
    assert client.get(url).json()["status"] == "queued"
    assert client.get(url).content == _orm_body(session, job_id)  # served twice from one row

    assert jobs.claim_job(session, job_id, "host:1")
    assert client.get(url).json()["status"] == "running"
    jobs.update_progress(session, job_id, progress=0.25, metrics={"epochs": [{"epoch": 1, "loss": 0.5}]})
    first = client.get(url).json()
    assert first["progress"] == 0.25 and first["metrics"]["epochs"] == [{"epoch": 1, "loss": 0.5}]

    # Only the JSON column changes.
    jobs.update_progress(session, job_id, metrics={"epochs": [{"epoch": 1, "loss": 0.4}]})
    assert client.get(url).json()["metrics"]["epochs"] == [{"epoch": 1, "loss": 0.4}]
    # Only a timestamp changes.
    jobs.heartbeat(session, job_id)
    assert client.get(url).content == _orm_body(session, job_id)
    # Only the cancel flag changes.
    jobs.request_cancel(session, job_id)
    assert client.get(url).json()["cancel_requested"] is True

    assert jobs.finish_job(session, job_id, JobStatus.cancelled)
    assert client.get(url).content == _orm_body(session, job_id)


def test_deleted_job_is_404_again(client, app, session) -> None:  # type: ignore[no-untyped-def]
    job_id = _new_job(session)
    assert client.get(f"{API}/jobs/{job_id}").status_code == 200
    assert len(app.state.job_bodies) == 1
    session.delete(session.get(Job, job_id))
    session.commit()
    response = client.get(f"{API}/jobs/{job_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"Job {job_id} not found"}
    assert len(app.state.job_bodies) == 0


def test_too_long_job_id_is_422(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get(f"{API}/jobs/{'x' * 65}")
    assert response.status_code == 422
    assert response.json() == {"detail": "path.job_id: String should have at most 64 characters"}


def test_bodies_keep_the_most_recently_read_jobs(app, session) -> None:  # type: ignore[no-untyped-def]
    bodies = JobBodies(app.state.engine, size=2)
    ids = [_new_job(session) for _ in range(3)]
    for job_id in ids:
        assert bodies.get(job_id) == _orm_body(session, job_id)
    assert len(bodies) == 2
    assert bodies.get(ids[0]) == _orm_body(session, ids[0])  # dropped, read and serialised again
    assert len(bodies) == 2
    assert bodies.get("no-such-job") is None
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        JobBodies(app.state.engine, size=0)


def test_sqlite_is_read_on_the_event_loop_and_a_server_in_the_threadpool(app, database_url) -> None:  # type: ignore[no-untyped-def]
    assert app.state.job_bodies.on_event_loop is database_url.startswith("sqlite")


def test_stored_reader_reads_through_the_driver_and_loads_as_the_orm(app, session) -> None:  # type: ignore[no-untyped-def]
    job_id = _new_job(session)
    assert jobs.claim_job(session, job_id, "host:1")
    engine = app.state.engine
    reader = StoredJobReader(["id", "status", "spec", "metrics", "started_at", "cancel_requested"], engine.dialect)
    dbapi_connection = engine.raw_connection()
    try:
        stored = reader.stored(dbapi_connection, job_id)
        assert reader.stored(dbapi_connection, "no-such-job") is None
    finally:
        dbapi_connection.close()
    with engine.connect() as connection:
        loaded = reader.load(connection, job_id)
        assert reader.load(connection, "no-such-job") is None
    assert stored is not None and loaded is not None
    assert stored[:2] == (job_id, "running") and isinstance(stored[2], str) and stored[3] is None
    assert loaded[0] == stored  # the same values, so that an unchanged row is recognised
    row = session.get(Job, job_id)
    assert loaded[1] == {
        "id": job_id,
        "status": "running",
        "spec": SPEC,
        "metrics": None,
        "started_at": row.started_at,
        "cancel_requested": False,
    }
    assert loaded[1]["started_at"].tzinfo is not None


def test_an_unchanged_row_is_not_serialised_again(app, session) -> None:  # type: ignore[no-untyped-def]
    bodies = JobBodies(app.state.engine)
    job_id = _new_job(session)
    first = bodies.get(job_id)
    assert bodies.get(job_id) is first
    jobs.request_cancel(session, job_id)
    changed = bodies.get(job_id)
    assert changed is not first and changed == _orm_body(session, job_id)


def test_stored_reader_refuses_names_that_are_not_columns() -> None:
    with pytest.raises(ValueError, match="not columns of the jobs table: colour, size"):
        StoredJobReader(["id", "colour", "size"], sqlite.dialect())


def test_every_jobout_field_is_a_jobs_column() -> None:
    # JobBodies reads exactly JobOut's fields from the jobs table: a new JobOut field needs its column.
    assert set(JobOut.model_fields) <= set(Job.__table__.columns.keys())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # a missing table: OperationalError on SQLite
def test_a_database_error_answers_503_as_for_every_route(client, app, session) -> None:  # type: ignore[no-untyped-def]
    job_id = _new_job(session)
    assert client.get(f"{API}/jobs/{job_id}").status_code == 200
    session.close()
    with app.state.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_elsewhere")
    response = client.get(f"{API}/jobs/{job_id}")
    assert response.status_code == 503
    assert response.json() == {"detail": "database unavailable; retry later"}
