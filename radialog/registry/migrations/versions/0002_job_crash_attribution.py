"""jobs: crash attribution (run_mode, isolated, crashes, lost_claims)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run_mode", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("isolated", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("crashes", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("lost_claims", sa.Integer(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("lost_claims")
        batch_op.drop_column("crashes")
        batch_op.drop_column("isolated")
        batch_op.drop_column("run_mode")
