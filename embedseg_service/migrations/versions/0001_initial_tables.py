"""Initial tables: jobs, models, volumes, job_volumes.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("kind IN ('train', 'predict', 'evaluate')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_jobs_status")
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_owner"), "jobs", ["owner"], unique=False)
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("spatial_dims", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("data_properties", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("source_job_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("spatial_dims IN (2, 3)", name=op.f("ck_models_spatial_dims")),
        sa.ForeignKeyConstraint(
            ["source_job_id"], ["jobs.id"], name=op.f("fk_models_source_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_models_storage_key")),
    )
    op.create_index("ix_models_owner_created_at", "models", ["owner", "created_at"], unique=False)
    op.create_index(op.f("ix_models_source_job_id"), "models", ["source_job_id"], unique=False)

    op.create_table(
        "volumes",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("axes", sa.String(length=8), nullable=False),
        sa.Column("voxel_size", sa.JSON(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_job_id", sa.String(length=36), nullable=True),
        sa.Column("image_volume_id", sa.String(length=36), nullable=True),
        sa.CheckConstraint("kind IN ('image', 'labels')", name=op.f("ck_volumes_kind")),
        sa.ForeignKeyConstraint(
            ["image_volume_id"], ["volumes.id"], name=op.f("fk_volumes_image_volume_id_volumes"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["source_job_id"], ["jobs.id"], name=op.f("fk_volumes_source_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_volumes_storage_key")),
    )
    op.create_index(op.f("ix_volumes_image_volume_id"), "volumes", ["image_volume_id"], unique=False)
    op.create_index("ix_volumes_owner_created_at", "volumes", ["owner", "created_at"], unique=False)
    op.create_index(op.f("ix_volumes_source_job_id"), "volumes", ["source_job_id"], unique=False)

    op.create_table(
        "job_volumes",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("volume_id", sa.String(length=36), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_volumes_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["volume_id"], ["volumes.id"], name=op.f("fk_job_volumes_volume_id_volumes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "volume_id", "role", name=op.f("pk_job_volumes")),
    )
    op.create_index(op.f("ix_job_volumes_volume_id"), "job_volumes", ["volume_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_volumes_volume_id"), table_name="job_volumes")
    op.drop_table("job_volumes")
    op.drop_index(op.f("ix_volumes_source_job_id"), table_name="volumes")
    op.drop_index("ix_volumes_owner_created_at", table_name="volumes")
    op.drop_index(op.f("ix_volumes_image_volume_id"), table_name="volumes")
    op.drop_table("volumes")
    op.drop_index(op.f("ix_models_source_job_id"), table_name="models")
    op.drop_index("ix_models_owner_created_at", table_name="models")
    op.drop_table("models")
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    op.drop_index(op.f("ix_jobs_owner"), table_name="jobs")
    op.drop_table("jobs")
