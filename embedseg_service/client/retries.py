"""When and how long the client waits before sending a request again.

A request is sent again after a connection error or timeout, and after an answer that a later
resend may change: ``429`` (a quota of queued jobs), ``500``, ``502``, ``503``, ``504``, and ``409``
when it carries ``Retry-After`` (an ``Idempotency-Key`` whose first request is still being handled).
Other answers, every other 4xx among them, are final. The wait is the answer's ``Retry-After``
when it has one, else ``backoff * 2**attempt`` seconds, at most ``max_backoff``. Creating POSTs
carry an ``Idempotency-Key`` that stays the same across resends, so a resend never creates twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from embedseg_service.client.errors import ConnectionFailed

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
"""Failures to send or to receive an answer that a resend may not meet."""


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the answer's ``Retry-After`` asks for (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` resends at most after the first try, waiting as the module says."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")

    def should_retry(self, response: httpx.Response) -> bool:
        """Whether an answer with this status may change when the request is sent again."""
        if response.status_code == 409:
            return "Retry-After" in response.headers
        return response.status_code in RETRY_STATUSES

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before resend number ``attempt + 1`` (``attempt`` counts from 0)."""
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            return asked
        return min(self.backoff * 2**attempt, self.max_backoff)


def send_with_retries(
    attempt: Callable[[], httpx.Response],
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    what: str,
) -> httpx.Response:
    """Call ``attempt`` (one send whose body is read) until its answer is final or the retries are spent.

    Returns the last answer, which may be an error status; raises :class:`ConnectionFailed` when
    the last try met a connection error or timeout. ``what`` names the request in that message.
    """
    number = 0
    while True:
        try:
            response = attempt()
        except TRANSIENT_ERRORS as error:
            if number >= policy.retries:
                raise ConnectionFailed(
                    f"{what}: {type(error).__name__}: {error} (after {policy.retries} retries); "
                    "check that the server is up and the URL is right"
                ) from error
            sleep(policy.delay(number))
            number += 1
            continue
        if number >= policy.retries or not policy.should_retry(response):
            return response
        sleep(policy.delay(number, response))
        number += 1
