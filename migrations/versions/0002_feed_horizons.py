"""feed_horizons: how far each model's change feed was pruned (indexer compact, and after each snapshot).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Followers read their own model's changes through ix_changes_model_id_seq (made in 0001); this table
    # tells a follower whose position is below the pruned horizon that it must reload its snapshot.
    op.create_table(
        "feed_horizons",
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("pruned_through", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_feed_horizons")),
    )


def downgrade() -> None:
    op.drop_table("feed_horizons")
