"""``benchmarks/soak.py`` at a tiny size on the production path (PostgreSQL, Redis, a Celery worker process).

Two owners' clients submit six jobs, half of them resent with the same ``Idempotency-Key``; the
run must end with nothing lost, duplicated or leaked across owners, every predicted label volume
downloaded with its row's sha256, and its schema, Redis database and processes removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import POSTGRES_URL, production_services_problem, service_missing

from embedseg_service.records.db import make_engine

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def soak_schemas() -> set[str]:
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'soak\\_%'"))
            return {row[0] for row in rows}
    finally:
        engine.dispose()


def figure(output: str, name: str) -> int:
    """The number printed after ``name`` at the start of a line of the soak's report."""
    match = re.search(rf"^{name}\s+(\d+)", output, flags=re.MULTILINE)
    assert match, f"no '{name}' line in:\n{output}"
    return int(match.group(1))


def test_tiny_soak_loses_duplicates_and_leaks_nothing(tmp_path: Path) -> None:
    problem = production_services_problem()
    if problem:
        service_missing(problem)
    schemas_before = soak_schemas()
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDSEG_")}
    command = [sys.executable, str(SOAK), "--jobs", "6", "--owners", "2", "--clients", "2", "--workers", "1",
               "--predict-fraction", "0.5", "--resend-fraction", "0.5", "--timeout", "120", "--seed", "3"]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert figure(output, "submitted") == 6
    assert figure(output, "resent") > 0
    assert re.search(r"^completed\s+6 succeeded, 0 failed, 0 cancelled", output, flags=re.MULTILINE), output
    for name in ("lost", "duplicated", "leaks"):
        assert figure(output, name) == 0, output
    assert re.search(r"^downloads\s+[1-9]\d* predicted label volumes, .*; 0 mismatches", output,
                     flags=re.MULTILINE), output  # fmt: skip
    assert "cross-owner probes: 0," not in output
    assert soak_schemas() == schemas_before  # its schema was dropped
