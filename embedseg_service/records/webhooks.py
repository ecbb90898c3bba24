"""Webhook delivery: a finished job's JSON, signed, POSTed to its spec's ``callback_url``.

Where deliveries run. The transition that ends a job writes a ``pending`` record into
``Job.callback`` in the same transaction (:mod:`embedseg_service.records.jobs`), so every finished
job with a callback URL has one, whichever path ended it. The process that ended the job then
calls :func:`deliver_soon`: a few daemon threads of that process (a Celery pool process, the
embedded local worker's process, the API after cancelling a queued job) deliver it, so the job's
claim and its worker are free at once and a slow receiver never delays or fails a job. The same
code runs with and without a broker; no task or extra process is needed. A delivery is leased
(``lease``/``lease_until`` in the record, taken by compare-and-set), so one process delivers it at a
time. When that process stops, the lease runs out and any worker's reconciler takes the delivery
over (:func:`resume_pending`, each pass), attempt count included, so the bound holds across restarts.

One attempt: the body is the job's ``JobOut`` JSON (as ``GET /api/v1/jobs/{id}`` answers it) with
``callback`` null, the same bytes on every attempt. The host is resolved and every address checked
again (:func:`embedseg_service.records.callbacks.resolve_target`: a name that now resolves to an
internal address is refused, which defeats DNS rebinding) and the request goes to the checked
address itself (``Host`` and the TLS server name are the URL's host, whose certificate is verified),
never through a proxy from the environment; redirects are not followed. Headers:
``X-EmbedSeg-Event`` (``job.succeeded``, ``job.failed``, ``job.cancelled``), ``X-EmbedSeg-Delivery``
(one id per job, for de-duplication), ``X-EmbedSeg-Attempt`` and ``X-EmbedSeg-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed by EMBEDSEG_WEBHOOK_SECRET>``
(:func:`verify_signature` checks one).

Outcomes: 2xx is delivered. Connection errors, timeouts, an unresolvable host, 429 and 5xx are
tried again after ``webhook_backoff_s * 2**(attempts - 1)`` seconds (or the answer's
``Retry-After``), at most ``webhook_max_delay_s``, until ``webhook_attempts`` attempts; then failed.
Any other answer (3xx, 4xx), a refused address or a missing secret fails the delivery at once.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import Text, cast, select, update
from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records.callbacks import TargetRefused, UnresolvedHost, resolve_target
from embedseg_service.records.jobs import rows_matched
from embedseg_service.records.orm import TERMINAL_STATUSES, Job, new_id, utcnow
from embedseg_service.records.schemas import JobOut
from embedseg_service.records.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_THREADS = 4
"""Threads per process that run deliveries (a delivery waiting for its next attempt holds none)."""
LEASE_SLACK_S = 30.0
"""A lease lasts until the next attempt is due, plus the attempt's timeout, plus this."""
SIGNATURE_TOLERANCE_S = 300
"""Default age limit of a signature's timestamp in :func:`verify_signature`."""
USER_AGENT = "embedseg-service-webhook"


# --------------------------------------------------------------------------- signatures


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>`` keyed by ``secret``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance_s: float = SIGNATURE_TOLERANCE_S, now: float | None = None
) -> bool:
    """Whether ``header`` (``X-EmbedSeg-Signature``) signs ``body`` (the exact bytes received) with
    ``secret`` and its timestamp is at most ``tolerance_s`` seconds from ``now`` (default: the clock)."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature_header(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


# --------------------------------------------------------------------------- one attempt


@dataclass(frozen=True)
class Outcome:
    """What one attempt gave: the receiver's HTTP status (None without an answer), what went wrong
    (None: delivered), whether to try again, and the answer's ``Retry-After`` header."""

    status: int | None
    error: str | None
    retry: bool = False
    retry_after: str | None = None


def job_body(session: Session, job_id: str) -> bytes | None:
    """The body of the job's delivery (``JobOut`` JSON with ``callback`` null), or None when no job has the id."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    return JobOut.model_validate(job).model_copy(update={"callback": None}).model_dump_json().encode()


def send(url: str, body: bytes, headers: Mapping[str, str], settings: Settings) -> Outcome:
    """POST ``body`` to ``url`` once, at an address checked against the settings' rules; see the module docstring."""
    try:
        target = resolve_target(url, settings.webhook_allowed_networks)
    except UnresolvedHost as error:
        return Outcome(None, str(error), retry=True)
    except TargetRefused as error:
        return Outcome(None, f"refused at delivery: {error}")
    parts = urlsplit(url)
    address = target.addresses[0]
    netloc = f"[{address}]:{target.port}" if address.version == 6 else f"{address}:{target.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": target.host} if parts.scheme.lower() == "https" else {}
    timeout = settings.webhook_timeout_s
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST", pinned, content=body, headers={**headers, "Host": parts.netloc}, extensions=extensions
            )
            response = client.send(request, stream=True)
            response.close()  # the answer's body is never read
    except httpx.TimeoutException as error:
        return Outcome(None, f"no answer within {timeout:g} s ({type(error).__name__})", retry=True)
    except httpx.TransportError as error:
        return Outcome(None, f"connection failed: {type(error).__name__}: {error}", retry=True)
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(status, None)
    if status == 429 or status >= 500:
        return Outcome(status, f"answered {status}", retry=True, retry_after=response.headers.get("retry-after"))
    if 300 <= status < 400:
        return Outcome(status, f"answered {status}; redirects are not followed")
    return Outcome(status, f"answered {status}")


def retry_delay(
    attempts: int, settings: Settings, retry_after: str | None = None, now: datetime | None = None
) -> float:
    """Seconds before the attempt after ``attempts`` attempts: ``webhook_backoff_s * 2**(attempts - 1)``, or the
    ``Retry-After`` header (seconds or an HTTP date), at most ``webhook_max_delay_s``."""
    delay = settings.webhook_backoff_s * 2.0 ** max(attempts - 1, 0)
    if retry_after is not None:
        text = retry_after.strip()
        try:
            delay = float(text) if text.isdigit() else (parsedate_to_datetime(text) - (now or utcnow())).total_seconds()
        except (TypeError, ValueError, OverflowError):
            pass
    return min(max(delay, 0.0), settings.webhook_max_delay_s)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def advance(record: Mapping[str, Any], outcome: Outcome, settings: Settings) -> tuple[dict[str, Any], float | None]:
    """The record after one more attempt with ``outcome``, and the seconds until the next attempt (None: it is over)."""
    now = utcnow()
    attempts = int(record.get("attempts", 0)) + 1
    new = {**record, "attempts": attempts, "last_status": outcome.status, "last_error": outcome.error}
    if outcome.error is None:
        new.update(state="delivered", delivered_at=_iso(now), next_attempt_at=None, lease=None, lease_until=None)
        return new, None
    if not outcome.retry or attempts >= settings.webhook_attempts:
        new.update(state="failed", next_attempt_at=None, lease=None, lease_until=None)
        return new, None
    delay = retry_delay(attempts, settings, outcome.retry_after, now)
    due = now + timedelta(seconds=delay)
    lease_until = due + timedelta(seconds=settings.webhook_timeout_s + LEASE_SLACK_S)
    new.update(next_attempt_at=_iso(due), lease_until=_iso(lease_until))
    return new, delay


# --------------------------------------------------------------------------- leases


def _parse(moment: Any) -> datetime | None:
    return datetime.fromisoformat(moment) if isinstance(moment, str) else None


def claimable(record: Any, now: datetime | None = None) -> bool:
    """Whether a delivery record is pending and no process holds a lease on it that runs."""
    if not isinstance(record, dict) or record.get("state") != "pending":
        return False
    lease_until = _parse(record.get("lease_until"))
    return lease_until is None or lease_until <= (now or utcnow())


def take_lease(sessions: sessionmaker[Session], job_id: str, settings: Settings) -> tuple[str, dict[str, Any]] | None:
    """Lease the job's pending delivery for this process: (lease token, record), or None when there is
    none or another process holds it (compare-and-set on the record as stored)."""
    now = utcnow()
    with sessions() as session:
        row = session.execute(select(cast(Job.callback, Text), Job.callback).where(Job.id == job_id)).first()
        if row is None or not claimable(row[1], now):
            session.commit()
            return None
        stored, record = row
        due = max(now, _parse(record.get("next_attempt_at")) or now)
        token = new_id()
        until = due + timedelta(seconds=settings.webhook_timeout_s + LEASE_SLACK_S)
        leased = {**record, "lease": token, "lease_until": _iso(until)}
        statement = (
            update(Job)
            .where(Job.id == job_id, cast(Job.callback, Text) == stored)
            .values(callback=leased)
            .execution_options(synchronize_session=False)
        )
        won = rows_matched(session.execute(statement)) == 1
        session.commit()
    return (token, leased) if won else None


def _write(sessions: sessionmaker[Session], job_id: str, token: str, record: Mapping[str, Any]) -> bool:
    """Store the record while this process's lease ``token`` still holds; False when it was taken over."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.callback["lease"].as_string() == token)
        .values(callback=dict(record))
        .execution_options(synchronize_session=False)
    )
    with sessions() as session:
        won = rows_matched(session.execute(statement)) == 1
        session.commit()
    return won


# --------------------------------------------------------------------------- deliveries


@dataclass
class Delivery:
    """One job's delivery as this process runs it: its lease token and record once leased."""

    job_id: str
    settings: Settings
    sessions: sessionmaker[Session]
    token: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def _headers(record: Mapping[str, Any], body: bytes, secret: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-EmbedSeg-Event": str(record.get("event", "")),
        "X-EmbedSeg-Delivery": str(record.get("delivery_id", "")),
        "X-EmbedSeg-Attempt": str(int(record.get("attempts", 0)) + 1),
        "X-EmbedSeg-Signature": signature_header(secret, body, int(time.time())),
    }


def step(delivery: Delivery) -> float | None:
    """Lease the delivery (first call) or make one attempt; seconds until the next call, or None when
    the delivery is over here (delivered, failed, or not this process's to deliver)."""
    if delivery.token is None:
        leased = take_lease(delivery.sessions, delivery.job_id, delivery.settings)
        if leased is None:
            return None
        delivery.token, delivery.record = leased
        due = _parse(delivery.record.get("next_attempt_at"))
        if due is not None and due > utcnow():
            return (due - utcnow()).total_seconds()
    with delivery.sessions() as session:
        body = job_body(session, delivery.job_id)
        session.commit()
    if body is None:
        return None
    secret = delivery.settings.webhook_secret
    if secret is None:
        outcome = Outcome(None, "EMBEDSEG_WEBHOOK_SECRET is not set where this delivery ran; it cannot be signed")
    else:
        headers = _headers(delivery.record, body, secret.get_secret_value())
        outcome = send(str(delivery.record.get("url", "")), body, headers, delivery.settings)
    record, delay = advance(delivery.record, outcome, delivery.settings)
    if not _write(delivery.sessions, delivery.job_id, delivery.token, record):
        log.warning("webhook of job %s: another process took the delivery over", delivery.job_id)
        return None
    delivery.record = record
    if delay is None:
        log.log(
            logging.INFO if record["state"] == "delivered" else logging.WARNING,
            "webhook of job %s %s after %d attempt(s)%s",
            delivery.job_id,
            record["state"],
            record["attempts"],
            f": {outcome.error}" if outcome.error else "",
        )
    return delay


class DeliveryPool:
    """Daemon threads of this process that run :func:`step` on deliveries when they are due.

    A job is in the pool at most once. Deliveries waiting for their next attempt hold no thread. A
    forked child (Celery's prefork pool) starts with an empty pool of its own.
    """

    def __init__(self, threads: int = DELIVERY_THREADS) -> None:
        self.threads = threads
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Delivery]] = []
        self._active: set[str] = set()
        self._workers: list[threading.Thread] = []
        self._order = itertools.count()

    def submit(self, delivery: Delivery) -> bool:
        """Run the delivery here; False when this process already runs the job's delivery."""
        if os.getpid() != self._pid:
            self._reset()
        with self._cond:
            if delivery.job_id in self._active:
                return False
            self._active.add(delivery.job_id)
            self._push(0.0, delivery)
            if len(self._workers) < self.threads:
                worker = threading.Thread(target=self._run, name="embedseg-webhook", daemon=True)
                self._workers.append(worker)
                worker.start()
        return True

    def _push(self, delay: float, delivery: Delivery) -> None:
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), delivery))
        self._cond.notify()

    def _next(self) -> Delivery:
        with self._cond:
            while True:
                wait = self._due[0][0] - time.monotonic() if self._due else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(self._due)[2]
                self._cond.wait(wait)

    def _run(self) -> None:
        while True:
            delivery = self._next()
            try:
                delay = step(delivery)
            except Exception as error:  # database unreachable: the lease runs out, a reconciler resumes it
                log.warning("webhook of job %s: %s: %s", delivery.job_id, type(error).__name__, error)
                delay = None
            with self._cond:
                if delay is None:
                    self._active.discard(delivery.job_id)
                else:
                    self._push(delay, delivery)


_pool = DeliveryPool()


def deliver_soon(
    job_id: str, settings: Settings, sessions: sessionmaker[Session], spec: Mapping[str, Any] | None = None
) -> bool:
    """Hand the finished job's webhook to this process's delivery threads; returns at once, never raises.

    ``spec``: the job's spec when the caller has it (nothing is scheduled without a ``callback_url``).
    Returns whether a delivery was scheduled.
    """
    if spec is not None and not spec.get("callback_url"):
        return False
    try:
        return _pool.submit(Delivery(job_id, settings, sessions))
    except Exception as error:  # e.g. no thread can be started: a reconciler delivers it later
        log.warning("webhook of job %s not scheduled: %s: %s", job_id, type(error).__name__, error)
        return False


def resume_pending(settings: Settings, sessions: sessionmaker[Session], limit: int = 100) -> list[str]:
    """Schedule the pending deliveries no process holds (their process stopped, or never started them);
    returns the ids of their jobs, oldest first (at most ``limit``)."""
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.callback)
            .where(
                Job.status.in_([status.value for status in TERMINAL_STATUSES]),
                Job.callback["state"].as_string() == "pending",
            )
            .order_by(Job.finished_at, Job.id)
        ).all()
        session.commit()
    now = utcnow()
    ids = [job_id for job_id, record in rows if claimable(record, now)][:limit]
    for job_id in ids:
        deliver_soon(job_id, settings, sessions)
    return ids
