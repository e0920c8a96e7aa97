"""Jobs: URL downloads (url, title, meta, bytes done/total) and the downloading and cancelled states.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = "state IN ('queued', 'decoding', 'encoding', 'ready', 'failed')"
NEW_STATES = "state IN ('queued', 'downloading', 'decoding', 'encoding', 'ready', 'failed', 'cancelled')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("title", sa.Text(), nullable=True))
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("bytes_done", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("bytes_total", sa.BigInteger(), nullable=True))
        batch.drop_constraint(op.f("ck_jobs_state"), type_="check")
        batch.create_check_constraint("state", NEW_STATES)


def downgrade() -> None:
    # Jobs in the new states have no place in the old schema: a download becomes queued again (it would
    # restart anyway), a cancelled job failed.
    op.execute("UPDATE jobs SET state = 'queued' WHERE state = 'downloading'")
    op.execute("UPDATE jobs SET state = 'failed' WHERE state = 'cancelled'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_state"), type_="check")
        batch.create_check_constraint("state", OLD_STATES)
        batch.drop_column("bytes_total")
        batch.drop_column("bytes_done")
        batch.drop_column("meta")
        batch.drop_column("title")
        batch.drop_column("url")
