"""A model's provenance (versions, seed, training inputs) and a job's webhook delivery record.

Revision ID: 0006_provenance_and_callbacks
Revises: 0005_job_lost_workers
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_provenance_and_callbacks"
down_revision: str | None = "0005_job_lost_workers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("models", sa.Column("provenance", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("callback", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("callback")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("provenance")
