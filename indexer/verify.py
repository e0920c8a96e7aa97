"""Index upkeep: cross-check catalog, token store and FAISS snapshot (and repair), and reindex into a new model."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, jobs, milvus_sync
from indexer.catalog import Job, Segment, Video
from indexer.db import session_scope
from indexer.errors import IndexerError, UserError
from indexer.feed_compaction import DEFAULT_RETENTION_S
from indexer.ingest import release_pending
from indexer.live_index import save_snapshot
from indexer.milvus_index import MilvusIndex
from indexer.paths import DataDir
from indexer.snapshot import CorruptSnapshotError, SnapshotNotFoundError
from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex

logger = logging.getLogger(__name__)

_CHUNK = 4096
_OPEN_STATES = ("queued", *jobs.ACTIVE_STATES)


# An upload older than this with no video row was interrupted; younger ones may still be in flight.
STRAY_GRACE_S = 3600.0


class UnknownModelError(IndexerError, UserError, LookupError):
    """The model to verify is not registered in the catalog."""


@dataclass
class VerifyReport:
    model_id: str
    segments: int = 0  # the catalog's segments of this model
    indexed: int = 0  # vectors in the snapshot
    snapshot: str = "ok"  # ok | missing | corrupt: ... | other model
    missing_tokens: list[int] = field(default_factory=list)  # segments without a valid token record
    orphan_tokens: list[int] = field(default_factory=list)  # records no segment (or running job) owns
    index_missing: list[int] = field(default_factory=list)  # segments the snapshot lacks (it lags)
    index_extra: list[int] = field(default_factory=list)  # snapshot ids with no segment (deleted videos)
    videos_without_segments: list[int] = field(default_factory=list)  # ready videos not in this index
    missing_files: list[int] = field(default_factory=list)  # videos whose stored file is gone (a warning)
    # Files in videos/ or incoming/ that no video owns, older than STRAY_GRACE_S: left by a process killed
    # between storing an upload and committing its row, or mid-upload (a warning; --repair deletes them).
    stray_files: list[str] = field(default_factory=list)
    requeued_jobs: list[int] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Catalog, token store and snapshot agree (missing source files are reported, not counted)."""
        problems = (self.missing_tokens, self.orphan_tokens, self.index_missing, self.index_extra)
        return self.snapshot == "ok" and not any(problems) and not self.videos_without_segments

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify(
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    repair: bool = False,
    *,
    index_device: str = "cpu",
    milvus: MilvusIndex | None = None,
    feed_retention_s: float = DEFAULT_RETENTION_S,
) -> VerifyReport:
    """Check one model's index; with `repair`, fix what can be fixed and return the state after the fix.

    Repairs: a lagging, corrupt or stale snapshot is rebuilt from the catalog and the token store;
    orphan records are freed; videos with missing records (or none at all) get a `reindex` job (run it
    with `indexer worker`, or `indexer verify --repair` runs it in-process). `index_device` is where a
    rebuilt index is built (indexer.index_device). With `milvus` (TVS_VECTOR_BACKEND=milvus) the collection
    is checked instead of a snapshot, and repaired row by row from the token store.
    """
    report = _check(data, session_factory, model_id, milvus)
    if not repair or (report.ok and not report.stray_files):
        return report
    actions: list[str] = []
    _delete_stray_files(data, report, actions)
    requeued = _requeue(session_factory, model_id, report, actions)
    _free_orphans(data, session_factory, model_id, report, actions)
    if milvus is not None:
        actions += milvus_sync.repair(
            milvus, data, session_factory, model_id, report.index_missing, report.index_extra
        )
    elif report.snapshot != "ok" or report.index_missing or report.index_extra:
        save_snapshot(
            data,
            session_factory,
            model_id,
            rebuild=True,
            device=index_device,
            feed_retention_s=feed_retention_s,
        )
        actions.append("rebuilt the index snapshot from the catalog and the token store")
    after = _check(data, session_factory, model_id, milvus)
    after.requeued_jobs, after.repaired = requeued, actions
    return after


def _model(session_factory: sessionmaker[Session], model_id: str) -> catalog.EmbeddingModel:
    with session_scope(session_factory) as session:
        model = catalog.get_model(session, model_id)
    if model is None:
        raise UnknownModelError(
            f"model {model_id!r} is not registered in the catalog; nothing was indexed with it"
        )
    return model


def _check(
    data: DataDir, session_factory: sessionmaker[Session], model_id: str, milvus: MilvusIndex | None = None
) -> VerifyReport:
    model = _model(session_factory, model_id)
    report = VerifyReport(model_id)
    with session_scope(session_factory) as session:
        seg_ids = np.asarray(catalog.segment_ids_for_model(session, model_id), np.int64)
        report.videos_without_segments = _videos_without_segments(session, model_id, model.active)
        in_flight = _videos_with_open_jobs(session, model_id)
        videos = session.execute(select(Video.id, Video.stored_path).where(Video.status != "deleted")).all()
    report.segments = len(seg_ids)
    report.missing_files = [v for v, p in videos if p and not data.resolve(p).exists()]
    report.stray_files = _stray_files(data, {p for _, p in videos if p})
    root = data.tokens_dir(model_id)
    with TokenStore(root, model.num_frames, model.dim, readonly=True) as store:
        for start in range(0, len(seg_ids), _CHUNK):
            report.missing_tokens += store.verify(seg_ids[start : start + _CHUNK])
        stored = [ids for ids, _ in store.iter_records()]
    record_ids = np.concatenate(stored) if stored else np.zeros(0, np.int64)
    journalled = [i for video, ids in data.pending(model_id).items() if video in in_flight for i in ids]
    report.orphan_tokens = np.setdiff1d(record_ids, np.union1d(seg_ids, journalled)).tolist()
    if milvus is not None:
        report.snapshot = "ok"  # no snapshot: the collection is the index
        report.indexed = milvus.size
        report.index_missing, report.index_extra = milvus_sync.compare(milvus, seg_ids)
        return report
    try:
        index, manifest = VectorIndex.load(data.index_path(model_id))
    except SnapshotNotFoundError:
        report.snapshot = "missing"
        return report
    except CorruptSnapshotError as e:
        report.snapshot = f"corrupt: {e}"
        return report
    if manifest.get("model_id") != model_id or index.dim != model.dim:
        report.snapshot = "other model"
        return report
    indexed = index.ids()
    report.indexed = len(indexed)
    report.index_missing = np.setdiff1d(seg_ids, indexed).tolist()
    report.index_extra = np.setdiff1d(indexed, seg_ids).tolist()
    return report


def _videos_without_segments(session: Session, model_id: str, active: bool) -> list[int]:
    if not active:  # another generation being built: its gaps are `indexer reindex --missing`'s business
        return []
    has_segments = exists().where(Segment.video_id == Video.id, Segment.model_id == model_id)
    stmt = select(Video.id).where(Video.status == "ready", ~has_segments).order_by(Video.id)
    return list(session.scalars(stmt))


def _videos_with_open_jobs(session: Session, model_id: str) -> set[int]:
    stmt = select(Job.video_id).where(Job.state.in_(_OPEN_STATES), Job.video_id.is_not(None))
    return {v for v in session.scalars(stmt) if v is not None}


def _requeue(
    session_factory: sessionmaker[Session], model_id: str, report: VerifyReport, actions: list[str]
) -> list[int]:
    with session_scope(session_factory) as session:
        damaged = {s.video_id for s in catalog.get_segments(session, report.missing_tokens)}
        videos = sorted(damaged | set(report.videos_without_segments))
        busy = _videos_with_open_jobs(session, model_id)
        job_ids = [jobs.enqueue(session, "reindex", v, model_id).id for v in videos if v not in busy]
    if job_ids:
        actions.append(f"queued {len(job_ids)} reindex job(s) for videos {videos}")
    return job_ids


def _stray_files(data: DataDir, owned: set[str], now: float | None = None) -> list[str]:
    """Files under videos/ and incoming/ (as catalog-relative paths) that no live video's `stored_path`
    names and that nothing has touched for a while."""
    cutoff = (time.time() if now is None else now) - STRAY_GRACE_S
    stray = []
    for folder in (data.videos, data.incoming):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(data.root).as_posix()
            try:
                if rel not in owned and path.is_file() and path.stat().st_mtime < cutoff:
                    stray.append(rel)
            except OSError:
                continue  # removed while we looked
    return stray


def _delete_stray_files(data: DataDir, report: VerifyReport, actions: list[str]) -> None:
    removed = 0
    for rel in report.stray_files:
        try:
            data.resolve(rel).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        actions.append(f"deleted {removed} stray file(s) no video owns (interrupted uploads)")


def _free_orphans(
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    report: VerifyReport,
    actions: list[str],
) -> None:
    model = _model(session_factory, model_id)
    with session_scope(session_factory) as session:
        in_flight = _videos_with_open_jobs(session, model_id)
    with TokenStore(data.tokens_dir(model_id), model.num_frames, model.dim) as store:
        for video_id in data.pending(model_id):
            if video_id not in in_flight:  # the journal of a crashed attempt nobody is resuming
                release_pending(session_factory, data, model_id, video_id, store)
        if report.orphan_tokens:
            store.free(report.orphan_tokens)
            store.flush()
            actions.append(f"freed {len(report.orphan_tokens)} orphan token record(s)")
