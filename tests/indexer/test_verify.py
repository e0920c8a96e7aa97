"""verify/repair across catalog, token store and snapshot; reindexing into a new model generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.bulk import reindex
from indexer.catalog import IndexMismatchError, Job
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.ingest import delete_video, ingest_file
from indexer.live_index import LiveIndex, save_snapshot
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from indexer.verify import UnknownModelError, verify
from indexer.worker import Worker
from model.checkpoint import load_model, save_checkpoint
from model.tokenbinder import TokenBinder
from synth.generator import write_pattern_video

T, D = 4, 32


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return load_model("tiny")


@pytest.fixture(scope="module")
def other_model(model: TokenBinder, tmp_path_factory: pytest.TempPathFactory) -> TokenBinder:
    """Same architecture, another model id (a checkpoint is identified by its weights)."""
    return load_model(str(save_checkpoint(model, tmp_path_factory.mktemp("ckpt"))))


class Library:
    def __init__(self, db_url: str, root: Path, model: TokenBinder) -> None:
        self.engine = make_engine(db_url)
        self.factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.data, self.root, self.model = DataDir(root / "data").ensure(), root, model
        self.videos: list[int] = []

    def add(self, n: int = 1) -> None:
        for _ in range(n):
            i = len(self.videos)
            path = write_pattern_video(self.root / f"clip{i}.mp4", 1.0 + 0.25 * i, 64, 48, 8, gop=8)
            result = ingest_file(self.factory, self.data, path, model_id=self.model.model_id, mode="in_place")
            self.videos.append(result.video_id)
        self.run_jobs()

    def run_jobs(self) -> None:
        worker = Worker(self.factory, self.data, self.model, poll_s=0.05)
        while worker.run_once():
            pass
        worker.close()

    def segments(self, video_id: int, model_id: str | None = None) -> list[int]:
        with session_scope(self.factory) as session:
            return [
                s.id for s in catalog.segments_for_video(session, video_id, model_id or self.model.model_id)
            ]

    def store(self) -> TokenStore:
        return TokenStore(self.data.tokens_dir(self.model.model_id), T, D)

    def verify(self, repair: bool = False):
        return verify(self.data, self.factory, self.model.model_id, repair=repair)


@pytest.fixture
def lib(migrated_sqlite_url: str, tmp_path: Path, model: TokenBinder) -> Iterator[Library]:
    library = Library(migrated_sqlite_url, tmp_path, model)
    library.add(2)
    save_snapshot(library.data, library.factory, model.model_id)
    yield library
    library.engine.dispose()


def test_an_index_that_agrees_passes(lib: Library) -> None:
    report = lib.verify()
    assert report.ok and report.segments == report.indexed == 2 and report.snapshot == "ok"
    with pytest.raises(UnknownModelError):
        verify(lib.data, lib.factory, "no-such-model")


def test_a_lagging_snapshot_is_found_and_repaired(lib: Library) -> None:
    lib.add()
    report = lib.verify()
    assert not report.ok and report.index_missing == lib.segments(lib.videos[-1])
    repaired = lib.verify(repair=True)
    assert repaired.ok and repaired.indexed == 3 and repaired.repaired


def test_a_deleted_video_still_in_the_index_is_found_and_repaired(lib: Library) -> None:
    gone = lib.segments(lib.videos[0])
    delete_video(lib.factory, lib.data, lib.videos[0])
    report = lib.verify()
    assert not report.ok and report.index_extra == gone
    assert lib.verify(repair=True).ok


def test_a_missing_token_record_requeues_its_video(lib: Library) -> None:
    damaged = lib.segments(lib.videos[1])
    with lib.store() as store:
        store.free(damaged)
        store.flush()
    report = lib.verify()
    assert not report.ok and report.missing_tokens == damaged
    repaired = lib.verify(repair=True)
    assert len(repaired.requeued_jobs) == 1 and not repaired.ok, "fixed only once the job has run"
    with session_scope(lib.factory) as session:
        job = session.get(Job, repaired.requeued_jobs[0])
        assert (job.kind, job.video_id, job.state) == ("reindex", lib.videos[1], "queued")
    lib.run_jobs()
    assert lib.verify(repair=True).ok and lib.verify().ok
    assert lib.segments(lib.videos[1]) != damaged


def test_orphan_records_and_stale_journals_are_freed(lib: Library) -> None:
    rng = np.random.default_rng(0)
    with lib.store() as store:
        store.put_many([9000, 9001], rng.standard_normal((2, T, D)), rng.standard_normal((2, D)))
        store.flush()
    lib.data.write_pending(lib.model.model_id, lib.videos[0], [9001])  # a crashed attempt's journal
    report = lib.verify()
    assert report.orphan_tokens == [9000, 9001]
    assert lib.verify(repair=True).ok
    with lib.store() as store:
        assert not store.has([9000, 9001]).any()
    assert not lib.data.pending(lib.model.model_id)


def test_reindex_builds_a_new_generation_and_switches_atomically(
    migrated_db_url: str, tmp_path: Path, model: TokenBinder, other_model: TokenBinder
) -> None:
    lib = Library(migrated_db_url, tmp_path, model)
    lib.add(3)
    old_segments = {v: lib.segments(v) for v in lib.videos}
    # A video that cannot be read any more keeps the switch from happening.
    moved = tmp_path / "clip1.mp4"
    moved.rename(tmp_path / "away.mp4")
    report = reindex(lib.factory, lib.data, other_model)
    assert not report.switched and list(report.failed) == [f"video {lib.videos[1]} ({moved})"]
    with session_scope(lib.factory) as session:
        assert catalog.get_active_model(session).id == model.model_id
    LiveIndex(lib.data, lib.factory, model.model_id, D, T).open(follow=False).close()  # still served

    (tmp_path / "away.mp4").rename(moved)
    report = reindex(lib.factory, lib.data, other_model)  # resumes: only the missing video
    assert report.switched and (report.files, report.indexed, report.failed) == (1, 1, {})
    with session_scope(lib.factory) as session:
        assert catalog.get_active_model(session).id == other_model.model_id
        assert not session.scalars(select(Job).where(Job.state != "ready")).all()
    for video_id in lib.videos:  # the old generation stays beside the new one
        assert lib.segments(video_id) == old_segments[video_id]
        assert len(lib.segments(video_id, other_model.model_id)) == 1
    assert verify(lib.data, lib.factory, other_model.model_id).ok
    with pytest.raises(IndexMismatchError):
        LiveIndex(lib.data, lib.factory, model.model_id, D, T).open()
    with pytest.raises(IndexMismatchError):
        Worker(lib.factory, lib.data, model).run_once()
    with LiveIndex(lib.data, lib.factory, other_model.model_id, D, T) as live:
        assert live.size == 3
    lib.engine.dispose()


def test_stray_files_of_interrupted_uploads_are_reported_and_deleted_after_a_grace_period(
    lib: Library,
) -> None:
    import os
    import time

    from indexer.verify import STRAY_GRACE_S

    old = time.time() - STRAY_GRACE_S - 60
    stored = lib.data.videos / ("ab" * 32 + ".mp4")  # stored, but the process died before its row
    partial = lib.data.incoming / "upload-1234.part"  # died mid-upload
    fresh = lib.data.incoming / "upload-5678.part"  # an upload in flight right now
    for path in (stored, partial, fresh):
        path.write_bytes(b"\0" * 1024)
    for path in (stored, partial):
        os.utime(path, (old, old))

    report = lib.verify()
    assert report.ok, "stray files are a warning: catalog, tokens and index still agree"
    assert sorted(report.stray_files) == sorted([lib.data.relative(stored), lib.data.relative(partial)])
    repaired = lib.verify(repair=True)
    assert not stored.exists() and not partial.exists() and fresh.exists()
    assert repaired.stray_files == [] and any("stray" in action for action in repaired.repaired)
    assert lib.verify().ok
