"""FastAPI dependencies: settings, database session, storage, and the job-status bodies."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from embedseg_service.records.jobs import StoredJobReader
from embedseg_service.records.schemas import JobOut
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import Storage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request; rolled back if the route raised, closed afterwards."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_app_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_app_storage)]


class JobBodies:
    """``JobOut`` JSON bodies of single jobs, for the status route that clients poll.

    Each call reads the job's row through the database driver (one primary-key select of the
    ``JobOut`` fields, nothing decoded) and serialises it only when it differs from the row
    behind the last body served for that job: the ``size`` most recently read jobs keep
    (stored row, body). A row that changed in any column is loaded and serialised again, so a
    body is never stale.
    """

    def __init__(self, engine: Engine, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.engine = engine
        self.size = size
        self.reader = StoredJobReader(list(JobOut.model_fields), engine.dialect)
        self._owner_at = self.reader.names.index("owner")
        # SQLite is a local file: a primary-key read takes microseconds and, in WAL mode, is not
        # blocked by the writer, so it runs on the event loop; a database server is read in the
        # threadpool so that its round trips never hold up other requests.
        self.on_event_loop = engine.dialect.name == "sqlite"
        self._bodies: OrderedDict[str, tuple[tuple[Any, ...], bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> bytes | None:
        """The job's body (UTF-8 JSON), or None when no job has the id.

        Database errors are raised as SQLAlchemy raises them (``OperationalError``: 503).
        """
        found = self.get_with_owner(job_id)
        return None if found is None else found[1]

    def get_with_owner(self, job_id: str) -> tuple[str | None, bytes] | None:
        """(the job's owner, its body), or None when no job has the id; see :meth:`get`."""
        dbapi_connection = self.engine.raw_connection()
        try:
            stored = self.reader.stored(dbapi_connection, job_id)
            if stored is None:
                self._forget(job_id)
                return None
        except self.engine.dialect.loaded_dbapi.Error:
            stored = ()  # a driver error: the load below meets it again and raises it the SQLAlchemy way
        finally:
            dbapi_connection.close()
        with self._lock:
            cached = self._bodies.get(job_id)
            if cached is not None and cached[0] == stored:
                self._bodies.move_to_end(job_id)
                return stored[self._owner_at], cached[1]
        with self.engine.connect() as connection:
            loaded = self.reader.load(connection, job_id)
        if loaded is None:
            self._forget(job_id)
            return None
        stored, values = loaded
        body = JobOut.model_validate(values).model_dump_json().encode()
        with self._lock:
            self._bodies[job_id] = (stored, body)
            self._bodies.move_to_end(job_id)
            while len(self._bodies) > self.size:
                self._bodies.popitem(last=False)
        return values["owner"], body

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._bodies.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._bodies)


MAX_OFFSET = 2**31 - 1
"""Largest ``offset`` a list route accepts (beyond any real listing, within every database's integers)."""

LimitQuery = Annotated[int, Query(ge=1, description="Page size (at most EMBEDSEG_PAGE_LIMIT_MAX)")]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip")]
