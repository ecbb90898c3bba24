"""The FastAPI application factory (``/api/v1``; OpenAPI docs at ``/docs``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from embedseg_service.api.auth import get_principal
from embedseg_service.api.dashboard import mount_dashboard
from embedseg_service.api.deps import JobBodies
from embedseg_service.api.errors import install_error_handlers
from embedseg_service.api.guards import RequestGuard
from embedseg_service.api.metrics import install_metrics
from embedseg_service.api.openapi import install_openapi
from embedseg_service.api.routes import health, jobs, metrics, models, volumes, workers
from embedseg_service.records.db import make_engine, make_sessionmaker, run_migrations
from embedseg_service.records.settings import Settings, get_settings
from embedseg_service.records.storage import STALE_TEMP_S, LocalStorage
from embedseg_service.records.stores import get_storage

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)

Hook = Callable[[FastAPI], None]

ROUTERS = (health.router, volumes.router, jobs.router, models.router, workers.router)
"""Every resource's router, mounted under :data:`API_PREFIX` in this order."""

OPEN_ROUTERS = (health.router,)
"""Routers answered without an API key (liveness and readiness probes); every other route needs one
once any key exists (see :mod:`embedseg_service.api.auth`)."""


def create_app(
    settings: Settings | None = None,
    *,
    migrate: bool | None = None,
    on_startup: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
) -> FastAPI:
    """Build the application.

    Args:
        settings: configuration (default: :func:`embedseg_service.records.settings.get_settings`).
        migrate: run the database migrations at start-up; default: only on the embedded
            default (SQLite with no broker). The production path runs ``embedseg db upgrade``.
        on_startup / on_shutdown: callables given the app after start-up / before shutdown
            (e.g. starting and stopping an embedded local worker).

    ``app.state`` holds ``settings``, ``engine``, ``sessionmaker``, ``storage``, ``job_bodies``
    (the bodies of the job-status route) and ``metrics`` (its Prometheus registry).
    """
    settings = settings or get_settings()
    if migrate is None:
        migrate = settings.is_sqlite and settings.embedded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            run_migrations(settings.database_url_resolved)
        if isinstance(app.state.storage, LocalStorage):
            app.state.storage.root.mkdir(parents=True, exist_ok=True)
        app.state.storage.clean_temp(older_than_s=STALE_TEMP_S)  # uploads cut off by a crash
        for hook in on_startup:
            hook(app)
        try:
            yield
        finally:
            for hook in on_shutdown:
                hook(app)
            app.state.engine.dispose()

    app = FastAPI(
        title="EmbedSeg Service",
        version="0.1.0",
        summary="Instance segmentation of 2D images and 3D volumes (EmbedSeg) with training and prediction jobs",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    engine = make_engine(settings.database_url_resolved, echo=settings.sql_echo)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = get_storage(settings)
    app.state.job_bodies = JobBodies(engine)

    install_error_handlers(app)
    if settings.cors_origins:
        # keys travel in the Authorization header, never in cookies: credentials stay off, so a
        # '*' origin can never be combined with them
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Content-Disposition", "Idempotent-Replayed", "Retry-After"],
        )
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)
    install_metrics(app, settings)  # outermost: requests the guard refuses are counted too
    for router in ROUTERS:
        guarded = [] if any(router is open_ for open_ in OPEN_ROUTERS) else [Depends(get_principal)]
        app.include_router(router, prefix=API_PREFIX, dependencies=guarded)
    app.include_router(metrics.router)  # /metrics beside /api/v1; admin key checked by the route
    mount_dashboard(app)
    install_openapi(app)
    return app
