"""error kinds: why a dialog turn failed, stored with it (states.ErrorKind) instead of read from its message

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no backfill: turns that failed before this revision keep NULL (api.dialog.error_status).
    with op.batch_alter_table("dialog_turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_kind", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dialog_turns", schema=None) as batch_op:
        batch_op.drop_column("error_kind")
