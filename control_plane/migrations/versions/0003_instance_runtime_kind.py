"""cloud_instances.runtime_kind: what runs in each instance (reference | quoroom)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00.000000

Existing instances run the reference Room: the server default fills them in as ``reference``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("cloud_instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "runtime_kind", sa.String(length=16), nullable=False, server_default="reference"
            )
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("cloud_instances", schema=None) as batch_op:
        batch_op.drop_column("runtime_kind")
