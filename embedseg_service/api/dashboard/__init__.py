"""Browser dashboard: one static page (HTML, vanilla JS, CSS; no build step) served at ``/dashboard``.

The page talks to the service only through the public ``/api/v1`` routes. On a server with API keys
it asks for one and sends it as ``Authorization: Bearer <key>`` with every call, previews and
downloads included (fetched with the header, shown or saved from blob URLs); the key is kept in the
browser's sessionStorage, or localStorage when the user ticks "remember on this browser".
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_PATH = "/dashboard"


def static_dir() -> Path:
    """Folder of the dashboard's files (``index.html``, ``dashboard.js``, ``dashboard.css``)."""
    return Path(__file__).resolve().parent / "static"


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at ``/dashboard/`` and redirect ``/`` to it (neither appears in OpenAPI)."""
    app.mount(DASHBOARD_PATH, StaticFiles(directory=static_dir(), html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse(url=DASHBOARD_PATH + "/", status_code=307)
