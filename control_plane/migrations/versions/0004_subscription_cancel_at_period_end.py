"""instance_subscriptions: cancel at period end, the current period's end, and the time of the
newest subscription snapshot applied (issue 12, item 8)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 14:00:00.000000

``cancel_at_period_end`` and ``current_period_end`` mirror the Stripe subscription (set by the
owner's API call and by ``customer.subscription.updated``); ``subscription_updated_at`` orders
those snapshots apart from the invoice events' ``last_event_at``, so a late snapshot never undoes
a newer one. Existing rows: not scheduled to cancel, period unknown until the next update.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("instance_subscriptions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "cancel_at_period_end", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch_op.add_column(
            sa.Column("current_period_end", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("subscription_updated_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("instance_subscriptions", schema=None) as batch_op:
        batch_op.drop_column("subscription_updated_at")
        batch_op.drop_column("current_period_end")
        batch_op.drop_column("cancel_at_period_end")
