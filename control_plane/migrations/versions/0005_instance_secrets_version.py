"""cloud_instances.secrets_version: the provider's app secrets version, persisted (issue 12)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 14:05:00.000000

Fly's Set Secrets answers a version; machines are created with it as ``min_secrets_version`` so
they never boot with older secrets. It was kept in the worker's memory only. Existing rows: none
known (a machine created for them later is created without the hint, as before).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("cloud_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("secrets_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("cloud_instances", schema=None) as batch_op:
        batch_op.drop_column("secrets_version")
