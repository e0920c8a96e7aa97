"""Keeping a Milvus collection equal to the catalog: compare ids, repair from the token store, rebuild."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import Segment, Video
from indexer.db import session_scope
from indexer.milvus_index import POINTER_TTL_S, MilvusIndex
from indexer.milvus_rebuild_lease import LEASE_S, RebuildLease
from indexer.milvus_schema import SegmentRow
from indexer.paths import DataDir
from indexer.token_store import TokenStore

logger = logging.getLogger(__name__)

_BATCH = 512  # segments per insert: one call stays well under Milvus's 64 MB message limit at D=512


def segment_rows(session_factory: sessionmaker[Session], ids: Sequence[int]) -> list[SegmentRow]:
    """The collection's scalar fields for live catalog segments, in id order (deleted videos left out)."""
    out: list[SegmentRow] = []
    cols = (Segment.id, Segment.video_id, Segment.start_s, Segment.end_s, Video.created_at, Video.duration_s)
    with session_scope(session_factory) as session:
        for start in range(0, len(ids), 900):
            chunk = [int(i) for i in ids[start : start + 900]]
            stmt = select(*cols).join(Video, Segment.video_id == Video.id)
            stmt = stmt.where(Segment.id.in_(chunk), Video.status != "deleted").order_by(Segment.id)
            out += [
                SegmentRow(r[0], r[1], float(r[2]), float(r[3]), r[4], r[5]) for r in session.execute(stmt)
            ]
    return out


def compare(index: MilvusIndex, segment_ids: np.ndarray) -> tuple[list[int], list[int]]:
    """(catalog segments the collection lacks, collection rows the catalog does not have)."""
    held = index.ids()
    return np.setdiff1d(segment_ids, held).tolist(), np.setdiff1d(held, segment_ids).tolist()


def copy_from_store(
    index: MilvusIndex,
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    ids: Sequence[int],
    collection: str | None = None,
) -> int:
    """Insert catalog segments into the current generation (or `collection`) from the token store; returns
    how many were written."""
    with session_scope(session_factory) as session:
        model = catalog.get_model(session, model_id)
    if model is None or not ids:
        return 0
    written = 0
    with TokenStore(data.tokens_dir(model_id), model.num_frames, model.dim, readonly=True) as store:
        for start in range(0, len(ids), _BATCH):
            rows = segment_rows(session_factory, ids[start : start + _BATCH])
            if not rows:
                continue
            tokens, cls = store.get([r.id for r in rows])
            index.add(rows, cls, tokens, collection=collection)
            written += len(rows)
    return written


def repair(
    index: MilvusIndex,
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    missing: Sequence[int],
    extra: Sequence[int],
) -> list[str]:
    """Delete the stray rows, copy in the missing ones; the actions taken, in words."""
    actions = []
    if extra:
        index.delete(extra)
        actions.append(f"deleted {len(extra)} Milvus row(s) the catalog does not have")
    if missing:
        n = copy_from_store(index, data, session_factory, model_id, missing)
        actions.append(f"copied {n} segment(s) the Milvus collection lacked from the token store")
    return actions


def rebuild(
    index: MilvusIndex,
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    *,
    lease_s: float = LEASE_S,
) -> int:
    """Fill a new generation with every catalog segment of the model (also: FAISS -> Milvus) while searches
    keep reading the current one, move the model's name to it, drop the old one; the segments it holds.

    One rebuild per model at a time (milvus_rebuild_lease: a second one raises RebuildInProgressError).
    The generation being filled is published in the next record first, so writers write to it too, and a
    writer that missed the record copies its rows in after its catalog commit (MilvusIndex.complete_add).
    What was committed before that is copied from the token store: the catalog is compared with the new
    generation after the fill and again after the switch. A row is deleted from the new generation only
    once this rebuild has seen it live in the catalog and then gone (ids are never reused): a row a writer
    has written but not yet committed is left alone.
    """
    with RebuildLease(index, lease_s=lease_s) as lease:
        target = index.new_generation()
        switched = False
        try:
            lease.publish(target)
            ids = _live_ids(session_factory, model_id).tolist()
            seen = set(ids)
            copy_from_store(index, data, session_factory, model_id, ids, target)
            _catch_up(index, data, session_factory, model_id, target, seen)
            lease.check()
            index.switch_to(target)
            switched = True
            # Every process's pointer (and cached physical name) now names `target` before writers stop
            # reading the next record, which the lease's exit clears.
            time.sleep(POINTER_TTL_S)
            n = _catch_up(index, data, session_factory, model_id, target, seen)
        except BaseException:
            if not switched:
                _drop_quietly(index, target)
            raise
    logger.info("rebuilt Milvus name %s as %s: %d segments", index.name, target, n)
    return n


def _drop_quietly(index: MilvusIndex, collection: str) -> None:
    try:
        index.drop_generation(collection)
    except Exception as e:  # the next rebuild's switch drops it
        logger.warning("could not drop the unfinished generation %s (%s)", collection, e)


def _live_ids(session_factory: sessionmaker[Session], model_id: str) -> np.ndarray:
    with session_scope(session_factory) as session:
        return np.asarray(catalog.segment_ids_for_model(session, model_id), np.int64)


def _catch_up(
    index: MilvusIndex,
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    target: str,
    seen: set[int],
) -> int:
    """Make generation `target` hold the catalog's segments (committed or deleted during a fill); the
    catalog's count. `seen`: every id this rebuild has read as live (a row is deleted only if in it)."""
    ids = _live_ids(session_factory, model_id)
    seen.update(ids.tolist())
    held = index.ids(collection=target)
    missing = np.setdiff1d(ids, held).tolist()
    gone = [i for i in np.setdiff1d(held, ids).tolist() if i in seen]
    if gone:
        index.delete(gone, collection=target)
    written = copy_from_store(index, data, session_factory, model_id, missing, target) if missing else 0
    if missing:
        # A copy races a delete: read live, deleted (from `target` too), then inserted here. Delete again
        # what the catalog no longer has; a delete committed after this look reaches `target` itself.
        back = np.setdiff1d(missing, _live_ids(session_factory, model_id)).tolist()
        if back:
            index.delete(back, collection=target)
            gone += back
    if written or gone:
        logger.info("generation %s caught up: %d copied in, %d deleted", target, written, len(gone))
    return len(ids)
