"""routing and output channels: study priority + routing decision, job priority, event rows in the outbox

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.String(length=8), server_default="ROUTINE", nullable=False))
        batch_op.add_column(sa.Column("routing", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_priority"), ["priority"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default=sa.text("1"), nullable=False))
        batch_op.create_index(batch_op.f("ix_jobs_priority"), ["priority"], unique=False)
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("event", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch_op.alter_column("report_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_index(batch_op.f("ix_exports_study_id"), ["study_id"], unique=False)
        batch_op.create_foreign_key("fk_exports_study_id_studies", "studies", ["study_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_constraint("fk_exports_study_id_studies", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_exports_study_id"))
        batch_op.alter_column("report_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("payload")
        batch_op.drop_column("event")
        batch_op.drop_column("study_id")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_priority"))
        batch_op.drop_column("priority")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_priority"))
        batch_op.drop_column("routing")
        batch_op.drop_column("priority")
