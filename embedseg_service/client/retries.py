"""When and how long the client waits before sending a request again.

A request is sent again after a connection error or timeout, and after an answer that a later
resend may change: ``429`` (a quota of queued jobs), ``500``, ``502``, ``503``, ``504``, and ``409``
when it carries ``Retry-After`` (an ``Idempotency-Key`` whose first request is still being handled).
Other answers, every other 4xx among them, are final. The wait is the answer's ``Retry-After``
when it has one, else ``backoff * 2**attempt`` seconds; either at most ``max_backoff``. Resends
stop after ``retries`` of them and, when ``deadline`` is set, once ``deadline`` seconds have passed
since the first try: the last wait is shortened to end there (a ``Retry-After`` that ends later is
not shortened: the answer is returned at once instead). Creating POSTs carry an
``Idempotency-Key`` that stays the same across resends, so a resend never creates twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    """At most ``retries`` resends after the first try (``None``: no count, ``deadline`` alone bounds
    them) and none after ``deadline`` seconds from the first try (``None``: no time bound)."""

    retries: int | None = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        numbers = (self.retries or 0, self.backoff, self.max_backoff, self.deadline or 0)
        if any(number < 0 for number in numbers):
            raise ValueError("retries, backoff, max_backoff and deadline must be >= 0")
        if self.retries is None and self.deadline is None:
            raise ValueError("give retries or a deadline (or both): retries=None alone would resend forever")

    def should_retry(self, response: httpx.Response) -> bool:
        """Whether an answer with this status may change when the request is sent again."""
        if response.status_code == 409:
            return "Retry-After" in response.headers
        return response.status_code in RETRY_STATUSES

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before resend number ``attempt + 1`` (``attempt`` counts from 0)."""
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff)

    def within(self, seconds: float | None) -> RetryPolicy:
        """This policy with its deadline at most ``seconds`` (``None``: unchanged)."""
        if seconds is None or (self.deadline is not None and self.deadline <= seconds):
            return self
        return replace(self, deadline=max(0.0, seconds))

    def next_wait(self, number: int, elapsed: float, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before resend ``number + 1`` after ``elapsed`` seconds since the first try, or
        None when no resend is left (the retries are spent, or the deadline is reached or, for a
        ``Retry-After``, would be passed)."""
        if self.retries is not None and number >= self.retries:
            return None
        wait = self.delay(number, response)
        if self.deadline is None:
            return wait
        left = self.deadline - elapsed
        asked = response is not None and retry_after(response) is not None
        if left <= 0 or (asked and wait > left):
            return None
        return min(wait, left)


def send_with_retries(
    attempt: Callable[[], httpx.Response],
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> httpx.Response:
    """Call ``attempt`` (one send whose body is read) until its answer is final or the resends are spent.

    Returns the last answer, which may be an error status; raises :class:`ConnectionFailed` when
    the last try met a connection error or timeout. ``what`` names the request in that message;
    ``clock`` measures the time since the first try against the policy's deadline.
    """
    start = clock()
    number = 0
    while True:
        try:
            response = attempt()
        except TRANSIENT_ERRORS as error:
            wait = policy.next_wait(number, clock() - start)
            if wait is None:
                raise ConnectionFailed(
                    f"{what}: {type(error).__name__}: {error} (after {number} retries over {clock() - start:.1f} s); "
                    "check that the server is up and the URL is right"
                ) from error
            sleep(wait)
            number += 1
            continue
        wait = policy.next_wait(number, clock() - start, response) if policy.should_retry(response) else None
        if wait is None:
            return response
        sleep(wait)
        number += 1
