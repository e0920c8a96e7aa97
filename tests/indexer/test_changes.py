"""The change feed and its follower: adds and deletes in order, late commits, gaps and errors."""

from __future__ import annotations

import hashlib
import logging
import threading

import pytest
from sqlalchemy import Result, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from indexer import catalog
from indexer.catalog import Change, NewSegment
from indexer.changes import ChangeFollower, changes_since, latest_seq
from indexer.db import make_engine, make_session_factory, session_scope

MODEL = "ViT-B-32@abc123"
OTHER = "ViT-B-16@def456"


class Recorder:
    """Collects what a follower applies, as ("add"|"delete", ids) calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.changed = threading.Event()

    def add(self, ids: list[int]) -> None:
        self.calls.append(("add", ids))
        self.changed.set()

    def delete(self, ids: list[int]) -> None:
        self.calls.append(("delete", ids))
        self.changed.set()

    def ids(self, op: str) -> list[int]:
        return [i for o, ids in self.calls if o == op for i in ids]


def follower(factory, recorder: Recorder, start_seq: int = 0, **kwargs) -> ChangeFollower:
    return ChangeFollower(factory, MODEL, recorder.add, recorder.delete, start_seq, **kwargs)


def new_video(factory: sessionmaker[Session], n: int, model_id: str = MODEL) -> int:
    with session_scope(factory) as session:
        catalog.ensure_model(session, model_id, "ViT-B-32", 512, 12)
        sha = hashlib.sha256(str(n).encode()).hexdigest()
        return catalog.create_video(session, sha256=sha, source=f"/{n}.mp4")[0].id


def segments(session: Session, count: int) -> list[NewSegment]:
    ids = catalog.allocate_segment_ids(session, count)
    return [NewSegment(id=i, ordinal=k, start_s=k, end_s=k + 1.0) for k, i in enumerate(ids)]


def index_video(
    factory: sessionmaker[Session], n: int, count: int, model_id: str = MODEL
) -> tuple[int, list[int]]:
    video_id = new_video(factory, n, model_id)
    with session_scope(factory) as session:
        added = catalog.add_segments(session, video_id, model_id, segments(session, count))
        return video_id, [s.id for s in added]


def put_change(factory: sessionmaker[Session], seq: int, segment_id: int, model_id: str = MODEL) -> None:
    # An explicit seq stands in for a transaction that took its seq early and committed late.
    with session_scope(factory) as session:
        session.add(Change(seq=seq, segment_id=segment_id, video_id=1, op="add", model_id=model_id))


def test_feed_reads_in_seq_order(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        assert latest_seq(session) == 0
    _, mine = index_video(session_factory, 1, 2)
    _, theirs = index_video(session_factory, 2, 1, OTHER)
    with session_scope(session_factory) as session:
        assert latest_seq(session) == 3
        assert [c.segment_id for c in changes_since(session, 0, MODEL)] == mine
        assert [c.segment_id for c in changes_since(session, 0)] == mine + theirs
        assert [c.segment_id for c in changes_since(session, 1, None, limit=1)] == mine[1:]


def test_follower_applies_adds_and_deletes_of_its_model(session_factory: sessionmaker[Session]) -> None:
    recorder = Recorder()
    feed = follower(session_factory, recorder)
    assert feed.poll() == 0
    first, first_ids = index_video(session_factory, 1, 3)
    index_video(session_factory, 2, 2, OTHER)
    _, second_ids = index_video(session_factory, 3, 1)
    assert feed.poll() == 4
    assert recorder.calls == [("add", first_ids + second_ids)]
    with session_scope(session_factory) as session:
        catalog.delete_video(session, first)
        top = latest_seq(session)
    assert feed.poll() == 3
    assert recorder.calls[-1] == ("delete", first_ids)
    assert feed.last_seq == top
    assert feed.poll() == 0


def test_follower_reads_only_its_models_rows(session_factory: sessionmaker[Session]) -> None:
    fetched: list[dict] = []

    def capture(state: ORMExecuteState) -> Result:
        rows = state.invoke_statement().freeze()
        fetched.extend(dict(row._mapping) for row in rows().all())
        return rows()

    _, first = index_video(session_factory, 1, 2)
    _, theirs = index_video(session_factory, 2, 3, OTHER)
    _, second = index_video(session_factory, 3, 1)
    theirs += index_video(session_factory, 4, 2, OTHER)[1]
    event.listen(session_factory, "do_orm_execute", capture)
    try:
        recorder = Recorder()
        feed = follower(session_factory, recorder)
        assert feed.poll() == 3
        assert feed.last_seq == 2  # seqs 3..5 may still be committing until they are counted
        assert feed.poll() == 0
        with session_scope(session_factory) as session:
            assert feed.last_seq == latest_seq(session, MODEL) == 6
    finally:
        event.remove(session_factory, "do_orm_execute", capture)
    assert recorder.calls == [("add", first + second)]
    assert fetched and not any(row.get("segment_id") in theirs for row in fetched)
    assert {row["model_id"] for row in fetched if "model_id" in row} <= {MODEL}


def test_follower_reports_how_far_behind_it_is(session_factory: sessionmaker[Session]) -> None:
    _, ids = index_video(session_factory, 1, 5)
    recorder = Recorder()
    feed = follower(session_factory, recorder, batch_size=2)
    assert (feed.lag.position, feed.lag.rows, feed.lag.seconds()) == (0, 0, 0.0)
    assert feed.measure().rows == 5
    feed.poll()
    lag = feed.lag
    with session_scope(session_factory) as session:
        third = session.get(Change, 3)
        assert third is not None
        assert (lag.position, lag.head, lag.rows, lag.oldest_unread_at) == (2, 5, 3, third.created_at)
    assert lag.seconds() > 0
    while feed.lag.rows:
        feed.poll()
    assert (feed.lag.position, feed.lag.head, feed.lag.rows, feed.lag.seconds()) == (5, 5, 0, 0.0)
    assert recorder.ids("add") == ids


def test_add_then_delete_in_one_poll_keeps_their_order(session_factory: sessionmaker[Session]) -> None:
    recorder = Recorder()
    feed = follower(session_factory, recorder)
    video_id, ids = index_video(session_factory, 1, 2)
    with session_scope(session_factory) as session:
        catalog.delete_video(session, video_id)
    assert feed.poll() == 4
    assert recorder.calls == [("add", ids), ("delete", ids)]


def test_a_seq_committed_late_is_not_skipped(session_factory: sessionmaker[Session]) -> None:
    recorder = Recorder()
    feed = follower(session_factory, recorder)
    put_change(session_factory, 1, 101)
    put_change(session_factory, 3, 103)
    assert feed.poll() == 2
    assert feed.last_seq == 1  # seq 2 may still be committing
    put_change(session_factory, 2, 102)
    put_change(session_factory, 4, 104, OTHER)
    assert feed.poll() == 1
    assert recorder.ids("add") == [101, 103, 102]
    assert feed.last_seq == 3  # seq 4 is another model's: a position counts in the follower's own feed


def test_a_gap_is_given_up_after_the_grace_period(
    session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    recorder = Recorder()
    feed = follower(session_factory, recorder, gap_grace_s=5.0, clock=lambda: clock[0])
    put_change(session_factory, 1, 101)
    put_change(session_factory, 4, 104)
    feed.poll()
    clock[0] = 4.0
    feed.poll()
    assert feed.last_seq == 1
    clock[0] = 6.0
    with caplog.at_level(logging.WARNING, logger="indexer.changes"):
        feed.poll()
    assert feed.last_seq == 4
    assert "2..3" in caplog.text
    put_change(session_factory, 2, 102)  # too late: the follower no longer waits for it
    assert feed.poll() == 0


def test_a_change_committed_late_just_below_the_start_is_applied(
    session_factory: sessionmaker[Session],
) -> None:
    # The index snapshot was taken at seq 3 while seq 2's transaction was still open.
    put_change(session_factory, 1, 101)
    put_change(session_factory, 3, 103)
    recorder = Recorder()
    feed = follower(session_factory, recorder, start_seq=3)
    assert feed.poll() == 0
    assert feed.last_seq == 1
    put_change(session_factory, 2, 102)
    assert feed.poll() == 1
    assert recorder.calls == [("add", [102])]
    assert feed.last_seq == 3


@pytest.mark.postgres
def test_postgres_transaction_committing_late_is_not_skipped(migrated_postgres_url: str) -> None:
    engine = make_engine(migrated_postgres_url)
    factory = make_session_factory(engine)
    try:
        slow_video = new_video(factory, 1)
        recorder = Recorder()
        feed = follower(factory, recorder)
        slow = factory()
        slow_ids = [s.id for s in catalog.add_segments(slow, slow_video, MODEL, segments(slow, 2))]
        _, fast_ids = index_video(factory, 3, 1)  # takes larger seqs, commits first
        assert feed.poll() == 1
        slow.commit()
        slow.close()
        assert feed.poll() == 2
        assert recorder.ids("add") == fast_ids + slow_ids
        with session_scope(factory) as session:
            assert feed.last_seq == latest_seq(session)
    finally:
        engine.dispose()


def test_follower_thread_survives_errors(session_factory: sessionmaker[Session]) -> None:
    failures = {"db": 2, "apply": 1}

    def flaky_factory() -> Session:
        if failures["db"]:
            failures["db"] -= 1
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return session_factory()

    recorder = Recorder()

    def flaky_add(ids: list[int]) -> None:
        if failures["apply"]:
            failures["apply"] -= 1
            raise RuntimeError("index busy")
        recorder.add(ids)

    feed = ChangeFollower(
        flaky_factory, MODEL, flaky_add, recorder.delete, 0, interval_s=0.01, max_backoff_s=0.05
    )
    _, ids = index_video(session_factory, 1, 2)
    feed.start()
    try:
        assert recorder.changed.wait(timeout=20), "the follower never applied the change"
    finally:
        feed.stop()
    assert recorder.calls == [("add", ids)]
    assert failures == {"db": 0, "apply": 0}
    assert feed.last_seq == 2


def test_follower_thread_gives_back_its_openmp_pool_after_applying(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An HNSW add runs faiss's OpenMP pool in the follower thread; left alive it slows the search thread's.
    from indexer import changes

    released = threading.Event()
    threads: list[str] = []

    def release() -> bool:
        threads.append(threading.current_thread().name)
        released.set()
        return True

    monkeypatch.setattr(changes, "release_openmp_threads", release)
    recorder = Recorder()
    feed = follower(session_factory, recorder, interval_s=0.01)
    feed.start()
    try:
        assert not released.wait(0.2), "nothing applied yet: nothing to give back"
        index_video(session_factory, 1, 2)
        assert released.wait(timeout=20), "the follower applied changes but kept its pool"
    finally:
        feed.stop()
    assert recorder.calls and set(threads) == {f"change-follower-{MODEL}"}
