"""A job's broker queue and the device of the worker process that ran it.

Revision ID: 0008_job_queue_and_device
Revises: 0007_workers
Create Date: 2026-12-05

Existing rows keep NULL in both: a NULL queue means the default queue (``EMBEDSEG_GPU_QUEUE``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_job_queue_and_device"
down_revision: str | None = "0007_workers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("queue", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("device", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("device")
        batch.drop_column("queue")
