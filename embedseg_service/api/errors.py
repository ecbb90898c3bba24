"""Error handlers: every error answers ``{"detail": ...}`` saying what is wrong and how to fix it.

Request validation errors become one string, ``"<where>: <message>"`` per problem joined by
``"; "``, where ``<where>`` is the body field path (``epochs``, ``pairs.0.gt_id``) or
``query.<name>`` / ``path.<name>`` / ``header.<name>``; a check across fields has no ``<where>``.
A write that finds the storage full (``ENOSPC``, ``EFBIG``, ``EDQUOT``) answers 507; writes go to
temporary files renamed into place, so nothing stored before is touched.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedseg_service.records.jobs import InputsMissing, InvalidTransition, JobNotFound
from embedseg_service.records.removal import ResourceInUse
from embedseg_service.records.storage import StorageError

log = logging.getLogger(__name__)


def format_validation_errors(errors: Sequence[Any]) -> str:
    """One readable sentence from pydantic/FastAPI validation errors."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        message = str(error.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        elif message.startswith("Assertion failed, "):
            message = message[len("Assertion failed, ") :]
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


def _json(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _json(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _json(422, format_validation_errors(exc.errors()))


async def _job_not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
    return _json(404, str(exc))


async def _inputs_missing(_request: Request, exc: InputsMissing) -> JSONResponse:
    return _json(404, str(exc))


async def _invalid_transition(_request: Request, exc: InvalidTransition) -> JSONResponse:
    return _json(409, str(exc))


async def _in_use(_request: Request, exc: ResourceInUse) -> JSONResponse:
    return _json(409, str(exc))


STORAGE_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
"""``errno`` values that mean the storage cannot hold what is being written: answered 507."""


def _storage_full(request: Request, exc: OSError) -> JSONResponse:
    log.error("storage full on %s %s: %s", request.method, request.url.path, exc)
    what = exc.strerror or errno.errorcode.get(exc.errno or 0, "storage full")
    return _json(
        507,
        f"the server's storage cannot hold this ({what}); nothing was stored and stored data is intact; "
        "retry later or ask the operator to free space",
    )


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    if exc.errno in STORAGE_FULL:
        return _storage_full(request, exc)
    log.error("storage error on %s %s: %s", request.method, request.url.path, exc)
    return _json(500, f"storage error: {exc}")


async def _os_error(request: Request, exc: OSError) -> JSONResponse:
    if exc.errno in STORAGE_FULL:
        return _storage_full(request, exc)
    return await _unexpected(request, exc)


async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
    log.error("database error on %s %s: %s", request.method, request.url.path, exc)
    return _json(503, "database unavailable; retry later")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json(500, f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(JobNotFound, _job_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(InputsMissing, _inputs_missing)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidTransition, _invalid_transition)  # type: ignore[arg-type]
    app.add_exception_handler(ResourceInUse, _in_use)  # type: ignore[arg-type]
    app.add_exception_handler(StorageError, _storage_error)  # type: ignore[arg-type]
    app.add_exception_handler(OSError, _os_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _database_down)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
