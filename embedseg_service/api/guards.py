"""Request guards run before routing: the Host header must be an allowed host, and a state-changing
request sent by a browser from another origin is refused.

Both answer JSON ``{"detail": ...}`` like every other error. The Host check defeats DNS rebinding
(a page of another site resolving its name to this server); the origin check stops cross-site
form posts, which browsers send without a CORS preflight.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` (a Host header value, port allowed) matches one of ``allowed``."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    for pattern in allowed:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class RequestGuard:
    """ASGI middleware applying the Host and cross-origin checks to every HTTP request."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.cors_origins = frozenset(origin.rstrip("/") for origin in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            await _refuse(send, 400, f"host {host!r} is not served here; add it to EMBEDSEG_ALLOWED_HOSTS to allow it")
            return
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not self._same_site(origin, host):
            await _refuse(
                send,
                403,
                f"cross-origin request from {origin} refused; add the origin to EMBEDSEG_CORS_ORIGINS to allow it",
            )
            return
        await self.app(scope, receive, send)

    def _same_site(self, origin: str, host: str) -> bool:
        # scheme ignored: behind a TLS proxy the page is https while this server sees http
        origin = origin.rstrip("/")
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        return urlsplit(origin).netloc.lower() == host.strip().lower()


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
