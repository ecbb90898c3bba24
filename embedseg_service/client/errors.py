"""What the client raises: the server's refusals, an unreachable server, jobs that did not succeed."""

from __future__ import annotations

from typing import Any

from embedseg_service.records.schemas import JobOut


class ClientError(Exception):
    """Base of every error the client raises."""


class ApiError(ClientError):
    """The server answered an error status; ``detail`` is its ``{"detail": ...}`` text."""

    def __init__(self, status: int, detail: str, *, method: str = "", url: str = "") -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url


class Unauthorized(ApiError):
    """401: the API key is missing, unknown or revoked."""


class NotFound(ApiError):
    """404: no such id among the rows this key may see."""


class ConnectionFailed(ClientError):
    """The server could not be reached (or kept failing) after every retry; the cause is chained."""


class WaitInterrupted(ConnectionFailed):
    """The server could not be reached (after every retry) while waiting for a job; ``job`` is its last
    state seen. The job may still run: waiting on it again resumes."""

    def __init__(self, job: JobOut, cause: ConnectionFailed) -> None:
        super().__init__(
            f"lost the server while waiting for job {job.id}, last seen {job.status.value} at "
            f"{job.progress * 100:.0f}% ({cause}); the job may still run: wait on it again to resume"
        )
        self.job = job


class JobFailed(ClientError):
    """A waited-for job ended ``failed`` or ``cancelled``; ``job`` is its last state."""

    def __init__(self, job: JobOut) -> None:
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} ({job.kind.value}) ended {job.status.value}{reason}")
        self.job = job


class WaitTimeout(ClientError, TimeoutError):
    """A job did not finish within the time given to wait for it; ``job`` is its last state."""

    def __init__(self, job: JobOut, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status.value} after {timeout:g} s; wait on it again to resume")
        self.job = job


def error_for(status: int, body: Any, *, method: str = "", url: str = "") -> ApiError:
    """The :class:`ApiError` (or subclass) for an error answer; ``body`` is the decoded JSON or text."""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    text = detail if isinstance(detail, str) else str(detail)
    cls = {401: Unauthorized, 404: NotFound}.get(status, ApiError)
    return cls(status, text or f"HTTP {status}", method=method, url=url)
