"""Pruning the change feed: bounded over repeated snapshots, the retention window, and a follower or an
index left behind the pruned horizon reloads instead of skipping changes."""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import Change
from indexer.changes import ChangeFollower, FeedPrunedError, feed_horizon, latest_seq
from indexer.db import session_scope
from indexer.feed_compaction import compact_feed, prune_model
from indexer.live_index import LiveIndex, save_snapshot
from indexer.paths import DataDir
from indexer.token_store import TokenStore

MODEL, DIM = "synthetic-32", 32


@pytest.fixture
def library(session_factory: sessionmaker[Session], tmp_path: Path) -> Iterator[tuple[DataDir, Callable]]:
    """(data dir, add(n) -> video id): n segments of MODEL with their tokens, as a worker commits them."""
    data = DataDir(tmp_path / "data").ensure()
    store = TokenStore(data.tokens_dir(MODEL), 1, DIM)
    rng = np.random.default_rng(0)
    counter = itertools.count()
    with session_scope(session_factory) as session:
        catalog.ensure_model(session, MODEL, "synthetic", DIM, 1)
        catalog.activate_model(session, MODEL)

    def add(n: int) -> int:
        sha = hashlib.sha256(str(next(counter)).encode()).hexdigest()
        with session_scope(session_factory) as session:
            video_id = catalog.create_video(session, sha256=sha, source="test")[0].id
        with session_scope(session_factory) as session:
            ids = catalog.allocate_segment_ids(session, n)
        vecs = rng.standard_normal((n, DIM)).astype(np.float32)
        store.put_many(ids, vecs[:, None, :], vecs)
        store.flush()
        rows = [catalog.NewSegment(i, o, float(o), float(o + 1)) for o, i in enumerate(ids)]
        with session_scope(session_factory) as session:
            catalog.add_segments(session, video_id, MODEL, rows)
            catalog.set_video_status(session, video_id, "ready")
        return video_id

    yield data, add
    store.close()


def _rows(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return session.scalar(select(func.count()).select_from(Change)) or 0


def _segment_ids(factory: sessionmaker[Session]) -> list[int]:
    with session_scope(factory) as session:
        return catalog.segment_ids_for_model(session, MODEL)


def test_snapshots_keep_the_feed_bounded(session_factory: sessionmaker[Session], library) -> None:
    data, add = library
    written = 0
    for _ in range(5):
        gone = add(3)
        add(4)
        catalog_delete(session_factory, gone)
        written += 3 + 4 + 3
        assert _rows(session_factory) <= 10
        save_snapshot(data, session_factory, MODEL, feed_retention_s=0)
        assert _rows(session_factory) == 0, "the snapshot covers every change: none is kept"
    with session_scope(session_factory) as session:
        assert feed_horizon(session, MODEL) == latest_seq(session) == written == 50
    # A replica starting now rebuilds (or loads) at the horizon and is not sent back to reload.
    with LiveIndex(data, session_factory, MODEL, DIM, 1) as live:
        assert live.ids().tolist() == _segment_ids(session_factory) and live.last_seq == 50


def test_the_retention_window_keeps_recent_changes(session_factory: sessionmaker[Session], library) -> None:
    data, add = library
    add(3)
    save_snapshot(data, session_factory, MODEL, feed_retention_s=3600)
    assert _rows(session_factory) == 3, "younger than the window: kept for replicas that are behind"
    report = compact_feed(data, session_factory, retention_s=0)
    assert report.pruned == 3 and [(m.model_id, m.pruned, m.kept) for m in report.models] == [(MODEL, 3, 0)]


def test_a_model_without_a_snapshot_keeps_its_changes(
    session_factory: sessionmaker[Session], library
) -> None:
    data, add = library
    add(2)
    report = compact_feed(data, session_factory, retention_s=0)
    assert [(m.snapshot_seq, m.pruned, m.kept, m.horizon) for m in report.models] == [(None, 0, 2, 0)]


def test_a_follower_behind_the_horizon_reloads(session_factory: sessionmaker[Session], library) -> None:
    _, add = library
    applied: list[int] = []
    reloads: list[int] = []

    def reload(horizon: int) -> int:
        reloads.append(horizon)
        return horizon  # as if a snapshot covering the horizon was loaded

    feed = ChangeFollower(session_factory, MODEL, applied.extend, lambda ids: None, 0, reload=reload)
    add(2)
    feed.poll()
    add(3)
    add(1)
    with session_scope(session_factory) as session:
        covered = catalog_latest(session) - 1  # a snapshot that holds all but the newest change
    prune_model(session_factory, MODEL, covered, retention_s=0)
    assert feed.poll() == 0 and reloads == [covered] and feed.last_seq == covered
    assert feed.poll() == 1 and applied[-1] == _segment_ids(session_factory)[-1]

    stuck = ChangeFollower(session_factory, MODEL, applied.extend, lambda ids: None, 0)
    with pytest.raises(FeedPrunedError, match="pruned through seq"):
        stuck.poll()


def test_an_index_behind_the_horizon_reloads_the_snapshot_or_rebuilds(
    session_factory: sessionmaker[Session], library, caplog: pytest.LogCaptureFixture
) -> None:
    data, add = library
    add(2)
    save_snapshot(data, session_factory, MODEL, feed_retention_s=3600)
    old = data.root.parent / "old-snapshot"
    shutil.copytree(data.index_path(MODEL).parent, old)
    replica = LiveIndex(data, session_factory, MODEL, DIM, 1, feed_retention_s=3600).open(follow=False)
    try:
        add(3)
        add(1)
        # Another process writes a newer snapshot, which prunes the changes this replica has not read.
        save_snapshot(data, session_factory, MODEL, feed_retention_s=0)
        assert _rows(session_factory) == 0
        with caplog.at_level(logging.WARNING, logger="indexer.changes"):
            replica.refresh()
        assert "reloading" in caplog.text
        assert replica.ids().tolist() == _segment_ids(session_factory)
    finally:
        replica.close()

    # A snapshot older than the horizon (an old copy put back) is not trusted: the index is rebuilt.
    for path in old.iterdir():
        shutil.copy(path, data.index_path(MODEL).parent / path.name)
    stale = LiveIndex(data, session_factory, MODEL, DIM, 1, feed_retention_s=3600).open(follow=False)
    try:
        assert stale.ids().tolist() == _segment_ids(session_factory) and stale.rebuilt
    finally:
        stale.close()


def catalog_delete(factory: sessionmaker[Session], video_id: int) -> None:
    with session_scope(factory) as session:
        catalog.delete_video(session, video_id)


def catalog_latest(session: Session) -> int:
    return session.scalar(select(func.max(Change.seq))) or 0
