"""A volume linked to a job cannot be deleted: job_volumes.volume_id ON DELETE RESTRICT (was CASCADE).

Revision ID: 0004_job_volume_restrict
Revises: 0003_idempotency_keys
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004_job_volume_restrict"
down_revision: str | None = "0003_idempotency_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_job_volumes_volume_id_volumes"


def _volume_link(ondelete: str) -> None:
    # batch mode: SQLite cannot alter a constraint, so the table is copied (PostgreSQL alters it in place)
    with op.batch_alter_table("job_volumes") as batch:
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        batch.create_foreign_key(FOREIGN_KEY, "volumes", ["volume_id"], ["id"], ondelete=ondelete)


def upgrade() -> None:
    _volume_link("RESTRICT")


def downgrade() -> None:
    _volume_link("CASCADE")
