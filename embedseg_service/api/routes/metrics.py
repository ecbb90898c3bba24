"""``GET /metrics``: the app's Prometheus metrics in the text exposition format (outside ``/api/v1`` and
the OpenAPI schema, at the path Prometheus scrapes by default)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from embedseg_service.api.auth import PrincipalDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, principal: PrincipalDep) -> Response:
    """The metrics of :mod:`embedseg_service.api.metrics`, read at this scrape.

    Open while no API key exists (the embedded default on loopback). Once keys exist it needs an admin
    key: none (or an invalid one) answers 401 like every other route, and an owner's key answers 403 —
    not 404, because the path is well known and hides no row, and 403 tells whoever sets up the scrape
    that the key works but must be an admin's. The metrics name every owner (stored bytes per owner),
    which only an admin may see. A database error answers 503.
    """
    if not principal.admin:
        raise HTTPException(
            status_code=403,
            detail="metrics need an admin API key (embedseg keys create --owner NAME --admin); this key is an owner's",
        )
    body = generate_latest(request.app.state.metrics.registry)
    return Response(content=body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
