"""Initial catalog schema: videos, models, segments, jobs, changes and the SQLite id allocator.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Segment ids and change seqs are int64 (FAISS ids); SQLite auto-assigns only to columns typed INTEGER.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "videos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("stored_path", sa.Text(), nullable=True),
        sa.Column("filename", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.Double(), nullable=True),
        sa.Column("fps", sa.Double(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'indexing', 'ready', 'failed', 'deleted')", name=op.f("ck_videos_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_videos")),
        sa.UniqueConstraint("sha256", name=op.f("uq_videos_sha256")),
    )
    op.create_index(op.f("ix_videos_status"), "videos", ["status"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("backbone", sa.String(length=100), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("num_frames", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
    )
    # At most one active model, enforced by the database.
    op.create_index(
        "ix_models_one_active",
        "models",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )

    op.create_table(
        "segments",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("start_s", sa.Double(), nullable=False),
        sa.Column("end_s", sa.Double(), nullable=False),
        sa.Column("thumbnail", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_segments_model_id_models")),
        sa.ForeignKeyConstraint(["video_id"], ["videos.id"], name=op.f("fk_segments_video_id_videos")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments")),
        sa.UniqueConstraint(
            "video_id", "model_id", "ordinal", name=op.f("uq_segments_video_id_model_id_ordinal")
        ),
    )
    op.create_index(op.f("ix_segments_model_id"), "segments", ["model_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=True),
        sa.Column("model_id", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", UTC, nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", UTC, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
        sa.CheckConstraint("kind IN ('ingest', 'reindex')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "state IN ('queued', 'decoding', 'encoding', 'ready', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.ForeignKeyConstraint(["video_id"], ["videos.id"], name=op.f("fk_jobs_video_id_videos")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_state_run_after", "jobs", ["state", "run_after"], unique=False)
    op.create_index(op.f("ix_jobs_video_id"), "jobs", ["video_id"], unique=False)

    op.create_table(
        "changes",
        sa.Column("seq", BIG_ID, nullable=False),
        sa.Column("segment_id", sa.BigInteger(), nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=False),
        sa.Column("op", sa.String(length=8), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("op IN ('add', 'delete')", name=op.f("ck_changes_op")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_changes")),
        # Never reuse a seq on SQLite, even after the newest rows were pruned.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_changes_model_id_seq", "changes", ["model_id", "seq"], unique=False)

    op.create_table(
        "id_allocator",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("next_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_id_allocator")),
    )


def downgrade() -> None:
    op.drop_table("id_allocator")
    op.drop_index("ix_changes_model_id_seq", table_name="changes")
    op.drop_table("changes")
    op.drop_index(op.f("ix_jobs_video_id"), table_name="jobs")
    op.drop_index("ix_jobs_state_run_after", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_segments_model_id"), table_name="segments")
    op.drop_table("segments")
    op.drop_index("ix_models_one_active", table_name="models")
    op.drop_table("models")
    op.drop_index(op.f("ix_videos_status"), table_name="videos")
    op.drop_table("videos")
