"""The record modules stay light: importing them loads neither FastAPI nor torch."""

from __future__ import annotations

import subprocess
import sys


def test_record_modules_import_without_fastapi_or_torch() -> None:
    code = (
        "import sys\n"
        "from embedseg_service.records import broker, db, jobs, orm, schemas, settings, storage\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'torch') if m in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_app_imports_without_torch() -> None:
    code = "import sys\nimport embedseg_service.api.app\nprint('torch' in sys.modules)\n"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"
