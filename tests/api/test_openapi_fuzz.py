"""Schemathesis over the OpenAPI schema, with an API key: no server error and no answer outside the
schema (status codes, content types, headers, bodies) on any route; schema-invalid requests are
refused; a route never answers without the key."""

from __future__ import annotations

from typing import Any

import numpy as np
import schemathesis
from helpers import tiff_bytes
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks as openapi_checks

from embedseg_service.records import keys

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
]
EXAMPLES = 30


def test_every_route_answers_within_its_schema(app: Any, client: Any, session: Any) -> None:
    secret = keys.create_key(session, "lab-a").secret
    headers = {"Authorization": f"Bearer {secret}"}
    # rows for the generated ids to meet now and then (most ids are random: 404)
    client.post("/api/v1/volumes", files={"file": ("x.tif", tiff_bytes(np.ones((8, 8), np.uint8)), "image/tiff")},
                headers=headers)  # fmt: skip
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # fmt: skip
        def run(case: Any) -> None:
            case.call_and_validate(headers={**headers, "Host": "testserver"}, checks=CHECKS)

        try:
            run()
        except BaseException as error:  # one report per route (schemathesis raises exception groups)
            if isinstance(error, KeyboardInterrupt):
                raise
            failures.append(f"{operation.label}: {str(error)[:2000]}")
    assert operations >= 19
    assert not failures, "\n\n".join(failures)
