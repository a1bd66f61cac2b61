"""access log per Room: launches, refreshes, membership changes and reported refusals (issue 15)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:30:00.000000

``access_log_entries`` (one row per launch, refresh or membership change; one row per minute,
reason and address for the refusals a runtime reports, with a count) and
``access_report_batches`` (the batch ids a runtime sent, so a replayed batch is refused). Both
start empty; nothing earlier is back-filled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "access_log_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("network", sa.String(length=64), nullable=True),
        sa.Column("region", sa.String(length=16), nullable=True),
        sa.Column("user_agent", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.String(length=48), nullable=True),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["cloud_instances.id"],
            name=op.f("fk_access_log_entries_instance_id_cloud_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_log_entries")),
        sa.UniqueConstraint(
            "instance_id",
            "kind",
            "at",
            "reason",
            "address",
            name="uq_access_log_entries_refusal",
        ),
    )
    with op.batch_alter_table("access_log_entries", schema=None) as batch_op:
        batch_op.create_index("ix_access_log_entries_instance", ["instance_id", "id"])
        batch_op.create_index("ix_access_log_entries_user", ["instance_id", "user_id", "id"])
        batch_op.create_index("ix_access_log_entries_at", ["at"])

    op.create_table(
        "access_report_batches",
        sa.Column("instance_id", sa.String(length=36), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["cloud_instances.id"],
            name=op.f("fk_access_report_batches_instance_id_cloud_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", "batch_id", name=op.f("pk_access_report_batches")),
    )
    with op.batch_alter_table("access_report_batches", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_access_report_batches_received_at"), ["received_at"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("access_report_batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_access_report_batches_received_at"))
    op.drop_table("access_report_batches")
    with op.batch_alter_table("access_log_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_access_log_entries_at")
        batch_op.drop_index("ix_access_log_entries_user")
        batch_op.drop_index("ix_access_log_entries_instance")
    op.drop_table("access_log_entries")
