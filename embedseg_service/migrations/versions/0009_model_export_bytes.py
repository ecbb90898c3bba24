"""Bytes of a model's stored exports (TorchScript, ONNX), counted in its owner's stored bytes.

Revision ID: 0009_model_export_bytes
Revises: 0008_job_queue_and_device
Create Date: 2026-12-04

Existing rows get 0; an export made before this revision is counted when the next export of that model is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_model_export_bytes"
down_revision: str | None = "0008_job_queue_and_device"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("models", sa.Column("export_bytes", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("export_bytes")
