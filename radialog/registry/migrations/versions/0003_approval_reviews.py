"""approval_reviews and finding_verdicts: what each approval says about the AI draft (agreement figures)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("draft_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("draft_chars", sa.Integer(), nullable=False),
        sa.Column("approved_chars", sa.Integer(), nullable=False),
        sa.Column("edit_distance", sa.Integer(), nullable=False),
        sa.Column("checklist", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["draft_id"],
            ["reports.id"],
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id"),
    )
    with op.batch_alter_table("approval_reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_approval_reviews_approved_at"), ["approved_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_approval_reviews_draft_id"), ["draft_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_approval_reviews_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_approval_reviews_study_id"), ["study_id"], unique=False)

    op.create_table(
        "finding_verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("ai_present", sa.Boolean(), nullable=False),
        sa.Column("ai_probability", sa.Float(), nullable=True),
        sa.Column("radiologist_present", sa.Boolean(), nullable=False),
        sa.Column("agree", sa.Boolean(), nullable=False),
        sa.Column("suggested", sa.String(length=8), nullable=True),
        sa.ForeignKeyConstraint(
            ["review_id"],
            ["approval_reviews.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("review_id", "label", name="uq_verdict_review_label"),
    )
    with op.batch_alter_table("finding_verdicts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_finding_verdicts_review_id"), ["review_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("finding_verdicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_finding_verdicts_review_id"))
    op.drop_table("finding_verdicts")
    with op.batch_alter_table("approval_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approval_reviews_study_id"))
        batch_op.drop_index(batch_op.f("ix_approval_reviews_model_name"))
        batch_op.drop_index(batch_op.f("ix_approval_reviews_draft_id"))
        batch_op.drop_index(batch_op.f("ix_approval_reviews_approved_at"))
    op.drop_table("approval_reviews")
