"""api keys; jobs.tenant and jobs.labels

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Jobs from before tenancy belong to the default tenant (the local, key-less one).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(100), nullable=False, server_default="default"))
        batch.add_column(sa.Column("labels", sa.String(200), nullable=False, server_default=""))
        batch.create_index("ix_jobs_tenant_status", ["tenant", "status"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_status")
        batch.drop_column("labels")
        batch.drop_column("tenant")
    op.drop_table("api_keys")
