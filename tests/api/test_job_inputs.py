"""A job never loses its inputs: a volume or model deleted at the moment a job that reads it is submitted,
on SQLite and PostgreSQL.

Either the submission wins (202; the delete waits for it, then answers 409 naming the job) or the
delete wins (204; the submission answers 404). The link rows are ``RESTRICT``, so the database
itself refuses to delete a volume an active job still links to.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from helpers import tiff_bytes, upload

from embedseg_service.records import jobs
from embedseg_service.records.orm import Job, JobVolume, Model, Volume
from embedseg_service.records.removal import ResourceInUse, delete_unless_in_use
from embedseg_service.records.storage import LocalStorage

API = "/api/v1"
ROUNDS = 12


def _labels() -> np.ndarray:
    labels = np.zeros((32, 24), np.uint16)
    labels[4:12, 4:12] = 1
    labels[16:28, 6:20] = 2
    return labels


def _race(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run both at the same moment in two threads; their results (an exception is returned, not raised)."""
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(index: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results[0], results[1]


def _jobs_without_inputs(session) -> list[str]:  # type: ignore[no-untyped-def]
    """Jobs a volume of whose spec no longer exists or has no link row, and predict jobs whose model is gone."""
    session.expire_all()
    volumes = set(session.scalars(sa.select(Volume.id)))
    models = set(session.scalars(sa.select(Model.id)))
    links = {
        (job_id, volume_id) for job_id, volume_id in session.execute(sa.select(JobVolume.job_id, JobVolume.volume_id))
    }
    broken = []
    for job in session.scalars(sa.select(Job)):
        spec = job.spec or {}
        wanted = [value for pair in spec.get("pairs", []) for value in (pair["gt_id"], pair["pred_id"])]
        wanted += spec.get("volume_ids", [])
        if any(v not in volumes or (job.id, v) not in links for v in wanted):
            broken.append(job.id)
        elif "model_id" in spec and spec["model_id"] not in models:
            broken.append(job.id)
    session.commit()
    return broken


def test_submit_and_delete_at_once_never_leave_a_job_without_its_volume(client, session) -> None:  # type: ignore[no-untyped-def]
    outcomes: Counter[tuple[int, int]] = Counter()
    for _ in range(ROUNDS):
        volume = upload(client, tiff_bytes(_labels()), kind="labels").json()["id"]
        submit, delete = _race(
            lambda volume=volume: client.post(
                f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": volume, "pred_id": volume}]}
            ),
            lambda volume=volume: client.delete(f"{API}/volumes/{volume}"),
        )
        outcomes[(submit.status_code, delete.status_code)] += 1
        if submit.status_code == 202:
            job_id = submit.json()["id"]
            assert delete.status_code == 409, delete.text
            assert delete.json()["detail"] == (
                f"Volume {volume} is used by queued or running job(s) {job_id}; cancel them or wait until they finish"
            )
            assert client.get(f"{API}/volumes/{volume}").status_code == 200
        else:
            assert (submit.status_code, delete.status_code) == (404, 204), (submit.text, delete.text)
            assert f"Volume {volume} not found" in submit.json()["detail"]
    assert set(outcomes) <= {(202, 409), (404, 204)}, outcomes
    assert _jobs_without_inputs(session) == []


def test_a_linked_volume_cannot_be_deleted_behind_the_checks_back(session) -> None:  # type: ignore[no-untyped-def]
    volume = Volume(
        name="v",
        kind="labels",
        sha256="0" * 64,
        shape=[8, 8],
        dtype="uint16",
        axes="YX",
        size_bytes=1,
        storage_key="volumes/v.tif",
    )
    session.add(volume)
    session.commit()
    jobs.create_job(session, "evaluate", {}, volumes=[(volume.id, "gt")])
    with pytest.raises(sa.exc.IntegrityError):
        session.execute(sa.delete(Volume).where(Volume.id == volume.id))
        session.flush()
    session.rollback()


def test_a_finished_jobs_links_go_with_the_volume(client, session) -> None:  # type: ignore[no-untyped-def]
    volume = upload(client, tiff_bytes(_labels()), kind="labels").json()["id"]
    job = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": volume, "pred_id": volume}]}).json()
    assert client.post(f"{API}/jobs/{job['id']}/cancel").status_code == 200
    assert client.delete(f"{API}/volumes/{volume}").status_code == 204
    session.expire_all()
    assert session.scalars(sa.select(JobVolume).where(JobVolume.job_id == job["id"])).all() == []
    assert client.get(f"{API}/jobs/{job['id']}").json()["status"] == "cancelled"


def test_create_and_delete_of_a_model_at_once(app, settings) -> None:  # type: ignore[no-untyped-def]
    sessions = app.state.sessionmaker
    storage = LocalStorage(settings.storage_path)
    outcomes: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        with sessions() as setup:
            model = Model(
                name=f"m{round_}", spatial_dims=2, config={}, storage_key=f"models/m{round_}.pt", size_bytes=1
            )
            setup.add(model)
            setup.commit()
        storage.put(model.storage_key, [b"x"])

        def create(model_id: str = model.id) -> Job:
            with sessions() as session:
                return jobs.create_job(session, "predict", {"model_id": model_id, "volume_ids": []}, model_id=model_id)

        def remove(model_id: str = model.id) -> None:
            with sessions() as session:
                row = session.get(Model, model_id)
                assert row is not None
                delete_unless_in_use(session, storage, row)

        created, removed = _race(create, remove)
        if isinstance(created, Job):
            assert isinstance(removed, ResourceInUse) and removed.job_ids == [created.id]
            assert storage.exists(model.storage_key)
            outcomes["job first"] += 1
        else:
            assert isinstance(created, jobs.InputsMissing) and created.missing == [f"Model {model.id}"], created
            assert removed is None and not storage.exists(model.storage_key)
            outcomes["delete first"] += 1
    with sessions() as session:
        assert _jobs_without_inputs(session) == []
    assert sum(outcomes.values()) == ROUNDS
