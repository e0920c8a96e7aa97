"""The catalog's data functions on SQLite and PostgreSQL: videos, segments, models, deletes and races."""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import EmbeddingModel, NewSegment, Video
from indexer.changes import changes_since
from indexer.db import default_database_url, make_engine, make_session_factory, session_scope
from indexer.jobs import enqueue, get_job

MODEL = "ViT-B-32@abc123"


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def make_video(session: Session, n: int = 0) -> Video:
    video, _ = catalog.create_video(session, sha256=sha(n), source=f"/lib/{n}.mp4", filename=f"{n}.mp4")
    return video


def add_video_with_segments(
    factory: sessionmaker[Session], n: int, count: int, model_id: str = MODEL
) -> list[int]:
    """Commits a video with `count` segments the way the pipeline does: ids first, then the rows."""
    with session_scope(factory) as session:
        catalog.ensure_model(session, model_id, "ViT-B-32", 512, 12)
        video_id = make_video(session, n).id
    with session_scope(factory) as session:
        ids = catalog.allocate_segment_ids(session, count)
        rows = [
            NewSegment(id=i, ordinal=k, start_s=15.0 * k, end_s=15.0 * (k + 1)) for k, i in enumerate(ids)
        ]
        catalog.add_segments(session, video_id, model_id, rows)
    return ids


def test_create_video_is_idempotent_per_hash(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        first, created = catalog.create_video(session, sha256=sha(1).upper(), source="/a.mp4", title="A")
        assert created and first.status == "pending" and first.meta == {}
        first.meta["codec"] = "h264"
    with session_scope(session_factory) as session:
        again, created = catalog.create_video(session, sha256=sha(1), source="/copy-of-a.mp4")
        assert not created and again.id == first.id and again.source == "/a.mp4"
        assert again.meta == {"codec": "h264"}
        assert catalog.get_video_by_sha256(session, sha(1)).id == first.id
        assert catalog.get_video(session, 999_999) is None
        with pytest.raises(ValueError, match="64 hex digits"):
            catalog.create_video(session, sha256="abc", source="/b.mp4")


def test_timestamps_are_timezone_aware_utc(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        video_id = make_video(session).id
    with session_scope(session_factory) as session:
        video = catalog.get_video(session, video_id)
        assert video.created_at.tzinfo is not None
        assert video.created_at.utcoffset().total_seconds() == 0
    with session_factory() as session:
        catalog.get_video(session, video_id).updated_at = datetime(2030, 1, 1)  # naive: refused, not guessed
        with pytest.raises(StatementError, match="naive datetime"):
            session.flush()


def test_list_videos_pages_and_hides_deleted(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        ids = [make_video(session, n).id for n in range(5)]
        catalog.set_video_status(session, ids[0], "ready")
        catalog.delete_video(session, ids[1])
    with session_scope(session_factory) as session:
        rows, total = catalog.list_videos(session, offset=0, limit=2)
        assert total == 4 and [v.id for v in rows] == [ids[4], ids[3]]
        rows, total = catalog.list_videos(session, offset=2, limit=2)
        assert [v.id for v in rows] == [ids[2], ids[0]]
        assert [v.id for v in catalog.list_videos(session, status="ready")[0]] == [ids[0]]
        assert [v.id for v in catalog.list_videos(session, status="deleted")[0]] == [ids[1]]
        with pytest.raises(ValueError, match="status"):
            catalog.set_video_status(session, ids[0], "gone")


def test_allocated_ids_are_never_handed_out_twice(session_factory: sessionmaker[Session]) -> None:
    session = session_factory()
    first = catalog.allocate_segment_ids(session, 3)
    session.rollback()  # the caller gave up: its ids stay used
    session.close()
    with session_scope(session_factory) as session:
        second = catalog.allocate_segment_ids(session, 4)
        assert catalog.allocate_segment_ids(session, 0) == []
    assert len(set(first + second)) == 7 and min(second) > max(first)
    ids = add_video_with_segments(session_factory, 1, 2)
    assert min(ids) > max(second)


def test_sqlite_allocation_inside_a_write_transaction_is_refused(migrated_sqlite_url: str) -> None:
    engine = make_engine(migrated_sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            make_video(session)
            with pytest.raises(catalog.IdAllocationError, match="commit first"):
                catalog.allocate_segment_ids(session, 2)
    finally:
        engine.dispose()


def test_add_segments_writes_add_changes(session_factory: sessionmaker[Session]) -> None:
    ids = add_video_with_segments(session_factory, 1, 3)
    with session_scope(session_factory) as session:
        changes = changes_since(session, 0, MODEL)
        assert [(c.segment_id, c.op) for c in changes] == [(i, "add") for i in ids]
        segments = catalog.segments_for_video(session, changes[0].video_id)
        assert [s.ordinal for s in segments] == [0, 1, 2] and segments[1].start_s == 15.0
        assert catalog.segment_ids_for_model(session, MODEL) == ids
        assert catalog.segment_ids_for_model(session, "other") == []


def test_segments_of_a_deleted_or_unknown_video_are_refused(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        catalog.ensure_model(session, MODEL, "ViT-B-32", 512, 12)
        video_id = make_video(session).id
        catalog.delete_video(session, video_id)
    row = [NewSegment(id=None, ordinal=0, start_s=0.0, end_s=1.0)]
    for target in (video_id, 424242):
        with pytest.raises(catalog.VideoNotAvailableError, match="not added"):
            with session_scope(session_factory) as session:
                catalog.add_segments(session, target, MODEL, row)


def test_foreign_keys_are_enforced(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as session:
            video_id = make_video(session).id
            catalog.add_segments(session, video_id, "unregistered-model", [NewSegment(None, 0, 0.0, 1.0)])


def test_delete_video_frees_segments_in_one_transaction(session_factory: sessionmaker[Session]) -> None:
    ids = add_video_with_segments(session_factory, 1, 3)
    kept = add_video_with_segments(session_factory, 2, 1)
    with session_scope(session_factory) as session:
        video_id = catalog.get_segments(session, ids[:1])[0].video_id
        job_id = enqueue(session, "ingest", video_id, MODEL).id
    with session_scope(session_factory) as session:
        assert catalog.delete_video(session, video_id) == ids
    with session_scope(session_factory) as session:
        assert catalog.get_video(session, video_id).status == "deleted"
        assert catalog.segments_for_video(session, video_id) == []
        assert catalog.segment_ids_for_model(session, MODEL) == kept
        deletes = [c.segment_id for c in changes_since(session, 0, MODEL) if c.op == "delete"]
        assert deletes == ids
        assert get_job(session, job_id).state == "failed"
        assert catalog.delete_video(session, video_id) == []
        assert catalog.delete_video(session, 424242) is None


def test_get_segments_keeps_order_and_loads_videos(session_factory: sessionmaker[Session]) -> None:
    ids = add_video_with_segments(session_factory, 1, 2) + add_video_with_segments(session_factory, 2, 2)
    wanted = [ids[3], 999_999, ids[0], ids[2]]
    with session_scope(session_factory) as session:
        segments = catalog.get_segments(session, wanted)
    # Read after the session closed: the videos were loaded with the segments.
    assert [s.id for s in segments] == [ids[3], ids[0], ids[2]]
    assert [s.video.sha256 for s in segments] == [sha(2), sha(1), sha(2)]


def test_models_register_once_and_one_is_active(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        catalog.ensure_model(session, "a", "ViT-B-32", 512, 12)
        catalog.ensure_model(session, "a", "ViT-B-32", 512, 12)
        catalog.ensure_model(session, "b", "ViT-B-16", 512, 12)
        with pytest.raises(catalog.ModelMismatchError, match="new id"):
            catalog.ensure_model(session, "a", "ViT-B-32", 768, 12)
        assert catalog.get_active_model(session) is None
        assert catalog.activate_model(session, "missing") is None
        assert catalog.activate_model(session, "a").active
    with session_scope(session_factory) as session:
        catalog.activate_model(session, "b")
    with session_scope(session_factory) as session:
        assert catalog.get_active_model(session).id == "b"
        assert not catalog.get_model(session, "a").active
    # The database itself refuses a second active model.
    with pytest.raises(IntegrityError):
        with session_scope(session_factory) as session:
            session.add(EmbeddingModel(id="c", backbone="x", dim=1, num_frames=1, active=True))


def test_stats_count_by_status(session_factory: sessionmaker[Session]) -> None:
    add_video_with_segments(session_factory, 1, 2)
    with session_scope(session_factory) as session:
        catalog.set_video_status(session, make_video(session, 2).id, "failed", error="broken file")
        enqueue(session, "ingest", None, MODEL)
    with session_scope(session_factory) as session:
        stats = catalog.catalog_stats(session)
    assert stats.segments == 2
    assert stats.videos_by_status == {"pending": 1, "indexing": 0, "ready": 0, "failed": 1, "deleted": 0}
    assert stats.jobs_by_state["queued"] == 1 and sum(stats.jobs_by_state.values()) == 1


def test_same_hash_from_racing_threads_makes_one_row(session_factory: sessionmaker[Session]) -> None:
    threads, rounds = 4, 5
    results: list[tuple[int, int, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker() -> None:
        try:
            for n in range(rounds):
                barrier.wait(timeout=30)
                with session_scope(session_factory) as session:
                    video, created = catalog.create_video(session, sha256=sha(n), source=f"/{n}.mp4")
                results.append((n, video.id, created))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    for n in range(rounds):
        mine = [r for r in results if r[0] == n]
        assert len({video_id for _, video_id, _ in mine}) == 1
        assert sum(created for _, _, created in mine) == 1
    with session_scope(session_factory) as session:
        assert session.scalar(select(Video.id).where(Video.sha256 == sha(0))) is not None
        assert catalog.list_videos(session, limit=100)[1] == rounds


def test_sqlite_engine_settings(migrated_sqlite_url: str) -> None:
    engine = make_engine(migrated_sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() > 0
    finally:
        engine.dispose()


def test_engine_urls(tmp_path) -> None:
    assert default_database_url(tmp_path) == f"sqlite:///{tmp_path}/catalog.db"
    with pytest.raises(ValueError, match="postgresql\\+psycopg"):
        make_engine("mysql://user@localhost/db")


def test_session_scope_commits_or_rolls_back(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError):
        with session_scope(session_factory) as session:
            make_video(session, 1)
            raise RuntimeError("boom")
    with session_scope(session_factory) as session:
        assert catalog.get_video_by_sha256(session, sha(1)) is None
        make_video(session, 2)
    with session_scope(session_factory) as session:
        assert catalog.get_video_by_sha256(session, sha(2)) is not None


def test_utc_conversion_of_other_timezones(session_factory: sessionmaker[Session]) -> None:
    from datetime import timedelta

    plus_two = timezone(timedelta(hours=2))
    with session_scope(session_factory) as session:
        video = make_video(session)
        video.updated_at = datetime(2030, 1, 1, 12, 0, tzinfo=plus_two)
        video_id = video.id
    with session_scope(session_factory) as session:
        stored = session.scalar(select(Video.updated_at).where(Video.id == video_id))
    assert stored == datetime(2030, 1, 1, 10, 0, tzinfo=timezone.utc) and stored.tzinfo is not None
