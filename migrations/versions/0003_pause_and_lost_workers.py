"""jobs.pause_requested: a running job asked to pause stays running until its worker has checkpointed;
jobs.lost_workers: how many of its workers were lost, which is what the attempt limit counts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("lost_workers", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lost_workers")
        batch.drop_column("pause_requested")
