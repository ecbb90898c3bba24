"""The OpenAPI schema as the service answers: every error body is ``{"detail": "<sentence>"}``.

FastAPI documents request validation errors as a list of objects; this service answers one
sentence (see :mod:`embedseg_service.api.errors`). The schema here says so for every error
status, and lists the statuses every route can answer: 422 (invalid request), 401 (routes that
need an API key, once keys exist) and 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string", "description": "What is wrong and how to fix it"}},
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
COMMON = {
    "422": "Invalid request: a path, query, header or body value (the detail names it)",
    "500": "Internal error (see the server log)",
}
AUTH = {"401": "Missing, malformed, unknown or revoked API key"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def service_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the service's error bodies (built once, then cached on the app)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            extra = {**COMMON, **(AUTH if operation.get("security") else {})}
            for status, description in extra.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = {"application/json": {"schema": ERROR_REF}}
                    response.setdefault("description", "Error")
    app.openapi_schema = schema
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`service_openapi` as the app's schema."""
    app.openapi = lambda: service_openapi(app)  # type: ignore[method-assign]
