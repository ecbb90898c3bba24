"""Count of a job's claims whose worker vanished, apart from its attempts (graceful stops count only there).

Revision ID: 0005_job_lost_workers
Revises: 0004_job_volume_restrict
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_job_lost_workers"
down_revision: str | None = "0004_job_volume_restrict"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lost_workers", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lost_workers")
