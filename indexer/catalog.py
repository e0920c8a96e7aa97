"""The catalog: SQLAlchemy models for videos, segments, jobs, changes and models, and their data functions.

Over 400 lines on purpose: the schema and every query on it stay in one module, so that a column and the
queries that read it change together (and Alembic's autogenerate sees one metadata).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from indexer.db import UTCDateTime, session_scope, utcnow
from indexer.errors import IndexerError, UserError

if TYPE_CHECKING:
    from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

VIDEO_STATUSES = ("pending", "indexing", "ready", "failed", "deleted")
JOB_KINDS = ("ingest", "reindex")
# downloading: a URL job fetching its file; cancelled: stopped by a user (DELETE /jobs/{id}), retryable.
JOB_STATES = ("queued", "downloading", "decoding", "encoding", "ready", "failed", "cancelled")
CHANGE_OPS = ("add", "delete")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Segment ids double as FAISS ids (int64); SQLite only auto-assigns ids to a column typed exactly INTEGER.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (CheckConstraint(f"status IN {_in(VIDEO_STATUSES)}", name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    stored_path: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[float | None]
    fps: Mapped[float | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    # MutableDict: in-place edits (video.meta["k"] = v) are saved too.
    meta: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSON()), default=lambda: {})
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class EmbeddingModel(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    backbone: Mapped[str] = mapped_column(String(100))
    dim: Mapped[int]
    num_frames: Mapped[int]
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# A partial unique index: the database itself refuses a second active model.
Index(
    "ix_models_one_active",
    EmbeddingModel.active,
    unique=True,
    sqlite_where=EmbeddingModel.active,
    postgresql_where=EmbeddingModel.active,
)


class Segment(Base):
    __tablename__ = "segments"
    # Also the index on video_id; it stops a resumed job from committing a video's segments twice.
    __table_args__ = (UniqueConstraint("video_id", "model_id", "ordinal"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"))
    ordinal: Mapped[int]
    start_s: Mapped[float]
    end_s: Mapped[float]
    thumbnail: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    video: Mapped[Video] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"kind IN {_in(JOB_KINDS)}", name="kind"),
        CheckConstraint(f"state IN {_in(JOB_STATES)}", name="state"),
        Index("ix_jobs_state_run_after", "state", "run_after"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    video_id: Mapped[int | None] = mapped_column(ForeignKey("videos.id"), index=True)
    model_id: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    # A URL ingest: the job downloads `url` first, then the video it makes gets `title` and `meta`.
    url: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON())
    bytes_done: Mapped[int | None] = mapped_column(BigInteger)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)  # None: the server did not say


class Change(Base):
    __tablename__ = "changes"
    # AUTOINCREMENT: SQLite never reuses a seq, even after the newest changes were pruned.
    __table_args__ = (
        CheckConstraint(f"op IN {_in(CHANGE_OPS)}", name="op"),
        Index("ix_changes_model_id_seq", "model_id", "seq"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    segment_id: Mapped[int] = mapped_column(BigInteger)
    video_id: Mapped[int]
    op: Mapped[str] = mapped_column(String(8))
    model_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FeedHorizon(Base):
    """How far one model's change feed was pruned: its changes with a seq up to `pruned_through` may be gone."""

    __tablename__ = "feed_horizons"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    pruned_through: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class IdAllocator(Base):
    """Next free segment id on SQLite (PostgreSQL uses the segments id sequence)."""

    __tablename__ = "id_allocator"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_id: Mapped[int] = mapped_column(BigInteger)


class VideoNotAvailableError(IndexerError, RuntimeError):
    """Segments were offered for a video that does not exist or was deleted meanwhile."""


class IdAllocationError(IndexerError, RuntimeError):
    """Segment ids cannot be allocated in the session's current state."""


class ModelMismatchError(IndexerError, UserError, ValueError):
    """A model id is already registered with different dimensions."""


class IndexMismatchError(IndexerError, UserError, RuntimeError):
    """The loaded model is not the one the catalog's index belongs to."""


@dataclass(frozen=True)
class NewSegment:
    """One segment to commit; `id` comes from allocate_segment_ids (tokens are written under it first)."""

    id: int | None
    ordinal: int
    start_s: float
    end_s: float
    thumbnail: str | None = None


@dataclass(frozen=True)
class CatalogStats:
    videos_by_status: dict[str, int]
    segments: int
    jobs_by_state: dict[str, int]


def _insert(session: Session, entity: type[Base]) -> Any:
    # Both dialects speak INSERT ... ON CONFLICT DO NOTHING, which makes get-or-create race-free.
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(entity)


def get_video(session: Session, video_id: int) -> Video | None:
    return session.get(Video, video_id)


def get_video_by_sha256(session: Session, sha256: str) -> Video | None:
    return session.scalars(select(Video).where(Video.sha256 == sha256.lower())).one_or_none()


def create_video(
    session: Session,
    *,
    sha256: str,
    source: str,
    title: str | None = None,
    stored_path: str | None = None,
    filename: str | None = None,
    size_bytes: int | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[Video, bool]:
    """Insert a pending video, or return the existing one with that hash; the bool says whether it is new.

    An existing video may be `deleted`; the caller decides whether to revive it.
    """
    sha256 = sha256.lower()
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    values: dict[str, Any] = dict(sha256=sha256, source=source, title=title, stored_path=stored_path)
    values.update(filename=filename, size_bytes=size_bytes, meta=meta or {}, status="pending")
    stmt = _insert(session, Video).values(**values).on_conflict_do_nothing(index_elements=["sha256"])
    new_id = session.execute(stmt.returning(Video.id)).scalar_one_or_none()
    if new_id is None:
        existing = get_video_by_sha256(session, sha256)
        if existing is None:
            raise RuntimeError(f"video {sha256} conflicted on insert but cannot be read back; retry")
        return existing, False
    video = session.get(Video, new_id)
    assert video is not None
    return video, True


def set_video_status(session: Session, video_id: int, status: str, error: str | None = None) -> Video | None:
    if status not in VIDEO_STATUSES:
        raise ValueError(f"video status must be one of {VIDEO_STATUSES}, got {status!r}")
    video = session.get(Video, video_id)
    if video is not None:
        video.status, video.error = status, error
        session.flush()
    return video


def list_videos(
    session: Session, offset: int = 0, limit: int = 50, status: str | None = None
) -> tuple[list[Video], int]:
    """Newest first; `status=None` lists every video that is not deleted."""
    where = Video.status == status if status is not None else Video.status != "deleted"
    total = session.scalar(select(func.count()).select_from(Video).where(where)) or 0
    rows = session.scalars(select(Video).where(where).order_by(Video.id.desc()).offset(offset).limit(limit))
    return list(rows), total


def allocate_segment_ids(session: Session, n: int) -> list[int]:
    """Reserve `n` fresh segment ids (never handed out twice; gaps are fine)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        # nextval is not transactional: a rolled-back caller can never give its ids to someone else.
        seq = func.pg_get_serial_sequence(Segment.__tablename__, "id")
        ids = session.scalars(select(func.nextval(seq)).select_from(func.generate_series(1, n)))
        return sorted(ids)
    # A short transaction of its own, so the ids stay used even if the caller rolls back, and the
    # SQLite write lock is not held while tokens are written.
    dbapi = session.connection().connection.dbapi_connection if session.in_transaction() else None
    if getattr(dbapi, "in_transaction", False):
        raise IdAllocationError(
            "allocate_segment_ids was called while this session holds SQLite's write lock (it has written "
            "in its open transaction), so a separate allocation transaction cannot run; commit first, or "
            "allocate before writing"
        )
    engine = getattr(bind, "engine", bind)
    with Session(engine) as own:
        own.execute(sqlite.insert(IdAllocator).values(name="segments", next_id=1).on_conflict_do_nothing())
        floor = select(func.coalesce(func.max(Segment.id), 0) + 1).scalar_subquery()
        end = own.execute(
            update(IdAllocator)
            .where(IdAllocator.name == "segments")
            .values(next_id=func.max(IdAllocator.next_id, floor) + n)
            .returning(IdAllocator.next_id)
        ).scalar_one()
        own.commit()
    return list(range(end - n, end))


def add_segments(session: Session, video_id: int, model_id: str, rows: Sequence[NewSegment]) -> list[Segment]:
    """Add a video's segments and their `add` changes in the caller's transaction."""
    # Locks the video row (PostgreSQL) or the database (SQLite) so a concurrent delete_video either
    # finishes first (and we refuse) or waits and then deletes these segments too.
    locked = session.execute(
        update(Video).where(Video.id == video_id, Video.status != "deleted").values(updated_at=utcnow())
    )
    if locked.rowcount == 0:  # type: ignore[attr-defined]
        raise VideoNotAvailableError(
            f"video {video_id} does not exist or was deleted; its segments were not added"
        )
    segments = [Segment(video_id=video_id, model_id=model_id, **asdict(r)) for r in rows]
    session.add_all(segments)
    session.flush()
    session.add_all(Change(segment_id=s.id, video_id=video_id, op="add", model_id=model_id) for s in segments)
    session.flush()
    return segments


def delete_video(session: Session, video_id: int) -> list[int] | None:
    """Mark a video deleted, drop its segments and queued jobs; return the freed segment ids."""
    now = utcnow()
    marked = session.execute(
        update(Video).where(Video.id == video_id).values(status="deleted", updated_at=now)
    )
    if marked.rowcount == 0:  # type: ignore[attr-defined]
        return None
    rows = session.execute(
        select(Segment.id, Segment.model_id).where(Segment.video_id == video_id).order_by(Segment.id)
    ).all()
    if rows:
        session.execute(delete(Segment).where(Segment.video_id == video_id))
        session.add_all(
            Change(segment_id=r.id, video_id=video_id, op="delete", model_id=r.model_id) for r in rows
        )
    session.execute(
        update(Job)
        .where(Job.video_id == video_id, Job.state == "queued")
        .values(state="failed", error="the video was deleted", finished_at=now, updated_at=now)
    )
    session.flush()
    return [r.id for r in rows]


def segments_for_video(session: Session, video_id: int, model_id: str | None = None) -> list[Segment]:
    stmt = select(Segment).where(Segment.video_id == video_id)
    if model_id is not None:
        stmt = stmt.where(Segment.model_id == model_id)
    return list(session.scalars(stmt.order_by(Segment.model_id, Segment.ordinal)))


def segment_ids_for_model(session: Session, model_id: str) -> list[int]:
    return list(session.scalars(select(Segment.id).where(Segment.model_id == model_id).order_by(Segment.id)))


def get_segments(session: Session, ids: Sequence[int]) -> list[Segment]:
    """Segments with their videos loaded, in the order of `ids`; unknown ids are left out."""
    found: dict[int, Segment] = {}
    for start in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[start : start + 500]]
        stmt = select(Segment).where(Segment.id.in_(chunk)).options(selectinload(Segment.video))
        found.update((s.id, s) for s in session.scalars(stmt))
    return [found[int(i)] for i in ids if int(i) in found]


def get_model(session: Session, model_id: str) -> EmbeddingModel | None:
    return session.get(EmbeddingModel, model_id)


def ensure_model(session: Session, model_id: str, backbone: str, dim: int, num_frames: int) -> EmbeddingModel:
    """Register a model id (idempotent and race-free); it starts inactive."""
    values = dict(id=model_id, backbone=backbone, dim=dim, num_frames=num_frames, active=False)
    session.execute(_insert(session, EmbeddingModel).values(**values).on_conflict_do_nothing())
    model = session.get(EmbeddingModel, model_id)
    assert model is not None
    if (model.backbone, model.dim, model.num_frames) != (backbone, dim, num_frames):
        raise ModelMismatchError(
            f"model {model_id!r} is registered as {model.backbone} dim={model.dim} "
            f"num_frames={model.num_frames}, not {backbone} dim={dim} num_frames={num_frames}; "
            "a model id must name one checkpoint, so give a changed checkpoint a new id"
        )
    return model


def get_active_model(session: Session) -> EmbeddingModel | None:
    return session.scalars(select(EmbeddingModel).where(EmbeddingModel.active.is_(True))).one_or_none()


def activate_model(session: Session, model_id: str) -> EmbeddingModel | None:
    """Make `model_id` the only active model, in the caller's transaction; None if it is unknown."""
    # Locking every model row serialises concurrent switches (a no-op lock on SQLite).
    session.execute(select(EmbeddingModel.id).with_for_update()).all()
    if session.get(EmbeddingModel, model_id) is None:
        return None
    session.execute(
        update(EmbeddingModel)
        .where(EmbeddingModel.id != model_id, EmbeddingModel.active.is_(True))
        .values(active=False)
    )
    session.execute(update(EmbeddingModel).where(EmbeddingModel.id == model_id).values(active=True))
    session.flush()
    return session.get(EmbeddingModel, model_id)


def _counts(session: Session, column: Any, keys: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(keys, 0)
    counts.update({k: n for k, n in session.execute(select(column, func.count()).group_by(column)).tuples()})
    return counts


def job_counts(session: Session) -> dict[str, int]:
    return _counts(session, Job.state, JOB_STATES)


def catalog_stats(session: Session) -> CatalogStats:
    return CatalogStats(
        videos_by_status=_counts(session, Video.status, VIDEO_STATUSES),
        segments=session.scalar(select(func.count()).select_from(Segment)) or 0,
        jobs_by_state=job_counts(session),
    )


def register_model(
    session_factory: sessionmaker[Session], model: TokenBinder, *, require_active: bool
) -> bool:
    """Record the model; activate it if none is active. Returns whether it is the active one.

    With `require_active`, a different active model raises IndexMismatchError.
    """
    cfg = model.config
    with session_scope(session_factory) as session:
        ensure_model(session, model.model_id, cfg.backbone, cfg.embed_dim, cfg.num_frames)
        active = get_active_model(session)
        if active is None:
            activate_model(session, model.model_id)
            return True
        if active.id != model.model_id and require_active:
            raise IndexMismatchError(
                f"the catalog's active model is {active.id!r} but this process loaded {model.model_id!r}; "
                f"start it with that model, or switch the library with `indexer reindex --model <spec>`"
            )
        return active.id == model.model_id


@dataclass(frozen=True)
class SegmentInfo:
    """What a search result needs of a segment's catalog rows (the segment and its video)."""

    id: int
    video_id: int
    title: str | None
    ordinal: int
    start_s: float
    end_s: float
    has_thumbnail: bool
    duration_s: float | None
    created_at: datetime
    meta: dict[str, Any] | None = None  # the video's meta; loaded only for a query that filters on it


def segment_infos(session: Session, ids: Sequence[int], with_meta: bool = False) -> dict[int, SegmentInfo]:
    """Catalog rows for segment ids; ids whose segment was deleted are simply absent.

    One joined SELECT of the columns a result needs (not ORM objects): this runs once per batch, on
    the latency path of every query. The videos' JSON meta is read only when a query filters on it.
    """
    out: dict[int, SegmentInfo] = {}
    cols: tuple[Any, ...] = (Segment.id, Segment.video_id, Video.title, Video.filename, Segment.ordinal,
                             Segment.start_s, Segment.end_s, Segment.thumbnail, Video.duration_s,
                             Video.created_at)  # fmt: skip
    if with_meta:
        cols = (*cols, Video.meta)
    for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit is 999 on old builds
        chunk = [int(i) for i in ids[start : start + 900]]
        stmt = select(*cols).join(Video, Segment.video_id == Video.id)
        stmt = stmt.where(Segment.id.in_(chunk), Video.status != "deleted")
        for row in session.execute(stmt):
            out[row.id] = SegmentInfo(
                id=row.id,
                video_id=row.video_id,
                title=row.title or row.filename,
                ordinal=row.ordinal,
                start_s=float(row.start_s),
                end_s=float(row.end_s),
                has_thumbnail=bool(row.thumbnail),
                duration_s=row.duration_s,
                created_at=row.created_at,
                meta=row.meta if with_meta else None,
            )
    return out
