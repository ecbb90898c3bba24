"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest
from helpers import production_services_problem, service_missing


@pytest.fixture(scope="module")
def services() -> None:
    """PostgreSQL and Redis answer (else the module's tests skip, or fail under EMBEDSEG_REQUIRE_SERVICES)."""
    problem = production_services_problem()
    if problem:
        service_missing(problem)
