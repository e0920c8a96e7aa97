"""`indexer rebuild-index --backend milvus` while workers write: nothing lost, and one rebuild at a time.

A writer thread runs the worker's own commit path (pipeline.Writer: token store, Milvus, catalog commit)
and the API's delete path (ingest.delete_video) continuously while a rebuild runs, each through a
MilvusIndex of its own (another process, as far as Milvus is concerned); afterwards the new generation
must equal the catalog exactly, with no `verify --repair`. Every test runs on the server as it is (Milvus
Lite: generations by pointer) and on Milvus Lite made to act as a server with aliases.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, milvus_index, milvus_sync
from indexer.catalog import ensure_model
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.errors import IndexerError, UserError
from indexer.ingest import delete_video
from indexer.milvus_generations import NextRecord
from indexer.milvus_index import MilvusIndex
from indexer.milvus_rebuild_lease import RebuildInProgressError
from indexer.milvus_schema import MilvusConfig
from indexer.paths import DataDir
from indexer.pipeline import EncodedSegment, VideoTask, Writer
from indexer.token_store import TokenStore
from model.video import VideoInfo

T, D = 4, 32
MODEL = "race/model:1"
INFO = VideoInfo(duration_s=6.0, fps=8.0, num_frames=48, width=32, height=24)


@dataclass
class World:
    data: DataDir
    factory: sessionmaker[Session]
    open: Callable[[], MilvusIndex]
    store: TokenStore

    def live(self) -> list[int]:
        with session_scope(self.factory) as session:
            return catalog.segment_ids_for_model(session, MODEL)


@pytest.fixture(params=["as served", "aliases emulated"])
def world(
    request: pytest.FixtureRequest,
    migrated_sqlite_url: str,
    tmp_path: Path,
    milvus_uri: str,
    milvus_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    from helpers.milvus import AliasingClient, real_server_uri

    if request.param == "aliases emulated":  # every client of the test sees one fake server with aliases
        if real_server_uri() is not None:
            pytest.skip("the server at TVS_TEST_MILVUS_URI has aliases of its own")
        connect, fake = milvus_index.connect, AliasingClient(None)
        monkeypatch.setattr(milvus_index, "connect", lambda config, attempts=5: fake.another(connect(config)))
    data = DataDir(tmp_path / "data").ensure()
    factory = make_session_factory(make_engine(migrated_sqlite_url))
    with session_scope(factory) as session:
        ensure_model(session, MODEL, "tiny", D, T)
    config = MilvusConfig(milvus_uri, prefix=milvus_prefix)
    opened: list[MilvusIndex] = []

    def open_index() -> MilvusIndex:
        opened.append(MilvusIndex(config, MODEL, D, T).open())
        return opened[-1]

    store = TokenStore(data.tokens_dir(MODEL), T, D)
    yield World(data, factory, open_index, store)
    store.close()
    if opened:
        opened[0].drop()
    for index in opened:
        index.close()


def _encoded(n: int, rng: np.random.Generator) -> list[EncodedSegment]:
    thumb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    return [
        EncodedSegment(i, 2.0 * i, 2.0 * i + 2, rng.standard_normal((T, D)), rng.standard_normal(D), thumb)
        for i in range(n)
    ]


def _new_video(world: World, rng: np.random.Generator) -> int:
    with session_scope(world.factory) as session:
        video, _ = catalog.create_video(session, sha256=rng.bytes(32).hex(), source="upload")
        return int(video.id)


class Traffic:
    """A worker and an API replica at once: add videos, re-ingest some (their old segments are replaced),
    delete others, each step through the real commit and delete paths, until stopped."""

    def __init__(self, world: World, sink: MilvusIndex, seed: int) -> None:
        self.world, self.sink, self.rng = world, sink, np.random.default_rng(seed)
        self.writer = Writer(world.factory, world.data, MODEL, world.store, sink=sink)
        self.videos: list[int] = []
        self.steps = {"added": 0, "replaced": 0, "deleted": 0}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def step(self) -> None:
        n, roll = len(self.videos), self.rng.random()
        if n >= 3 and roll < 0.25:
            vid = self.videos.pop(int(self.rng.integers(0, n)))
            delete_video(self.world.factory, self.world.data, vid, sink=self.sink)
            self.steps["deleted"] += 1
            return
        if n >= 2 and roll < 0.45:
            vid = self.videos[int(self.rng.integers(0, n))]
            self.writer.commit(VideoTask(vid, Path("replaced.mp4")), INFO, _encoded(2, self.rng))
            self.steps["replaced"] += 1
            return
        vid = _new_video(self.world, self.rng)
        self.writer.commit(
            VideoTask(vid, Path("new.mp4")), INFO, _encoded(int(self.rng.integers(1, 4)), self.rng)
        )
        self.videos.append(vid)
        self.steps["added"] += 1

    def wait_for(self, steps: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(self.steps.values()) < steps and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
                time.sleep(0.02)
        except BaseException as e:  # reported by stop()
            self.error = e

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


class SlowSink:
    """A worker's Milvus index whose write is followed by a long wait before the catalog commit (a stalled
    process, a lock wait)."""

    def __init__(self, index: MilvusIndex) -> None:
        self.index, self.written, self.go = index, threading.Event(), threading.Event()

    def add(self, rows: Any, cls: np.ndarray, tokens: np.ndarray) -> frozenset[str]:
        written = self.index.add(rows, cls, tokens)
        self.written.set()
        assert self.go.wait(120)
        return written

    def complete_add(self, *args: Any) -> frozenset[str]:
        return self.index.complete_add(*args)

    def delete(self, ids: Any) -> None:
        self.index.delete(ids)


class Straggler:
    """A worker (a process of its own: its own index and token store) that writes Milvus now and commits
    the catalog only when told to."""

    def __init__(self, world: World, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.sink, self.store = SlowSink(world.open()), TokenStore(world.data.tokens_dir(MODEL), T, D)
        writer = Writer(world.factory, world.data, MODEL, self.store, sink=self.sink)
        task, segments = VideoTask(_new_video(world, rng), Path("straggler.mp4")), _encoded(3, rng)
        self.ids: list[int] = []
        self.thread = threading.Thread(target=lambda: self.ids.extend(writer.commit(task, INFO, segments)))
        self.thread.start()
        assert self.sink.written.wait(60), "it wrote Milvus, and waits to commit"

    def commit(self) -> list[int]:
        self.sink.go.set()
        self.thread.join(60)
        self.store.close()
        return self.ids


def test_writes_during_a_rebuild_all_reach_the_new_generation_with_no_repair(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer_index, rebuilder = world.open(), world.open()
    seed = Traffic(world, writer_index, seed=1)
    for _ in range(12):
        seed.step()
    old = rebuilder.collection
    # Count the rows a writer had to copy in after its commit: it wrote while its cached "no rebuild" was
    # out of date (up to a second after the rebuild published its generation), or, the first straggler
    # below, long before it committed.
    late: list[frozenset[str]] = []
    complete = MilvusIndex.complete_add

    def counting(self: MilvusIndex, *args: Any, **kwargs: Any) -> frozenset[str]:
        added = complete(self, *args, **kwargs)
        late.append(added)
        return added

    monkeypatch.setattr(MilvusIndex, "complete_add", counting)
    copy = milvus_sync.copy_from_store
    # Two workers whose catalog commits come after the rebuild has finished: one wrote before the rebuild
    # began (the old generation only), one while it filled (both generations, and uncommitted while the
    # rebuild compared: its rows are not the catalog's yet, and must not be deleted as strays).
    before = Straggler(world, seed=9)
    during: list[Straggler] = []

    # Slow the fill and the catch-ups a little, so that every phase of the rebuild has writes beside it.
    def slow_copy(*args: Any, **kwargs: Any) -> int:
        time.sleep(0.5)
        if not during:
            during.append(Straggler(world, seed=10))
        return copy(*args, **kwargs)

    monkeypatch.setattr(milvus_sync, "copy_from_store", slow_copy)
    traffic = Traffic(world, writer_index, seed=2)
    traffic.videos = seed.videos
    with traffic:
        time.sleep(0.3)
        count = milvus_sync.rebuild(rebuilder, world.data, world.factory, MODEL)
        stalled = before.commit() + during[0].commit()  # after the rebuild's last comparison and switch
        traffic.wait_for(30)  # and some writes after it, to the new generation alone
    assert traffic.steps["added"] >= 10 and traffic.steps["deleted"] >= 2 and traffic.steps["replaced"] >= 2
    new = rebuilder.collection
    assert new not in (None, old) and count > 0
    live = world.live()
    assert len(stalled) == 6 and set(stalled) <= set(live)
    assert rebuilder.ids(collection=new).tolist() == live, "the new generation equals the catalog"
    assert rebuilder.next_record() is None, "the rebuild cleared its record"
    assert rebuilder.generations.generations(rebuilder._client, rebuilder.name) == [new]
    assert any(late), "some rows were copied in by their writer after its commit"
    fresh = world.open()  # a process that starts now reads the same
    assert fresh.ids().tolist() == live
    assert milvus_sync.compare(fresh, np.asarray(live, np.int64)) == ([], [])


def _blocked_rebuild(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Thread, threading.Event, threading.Event, dict[str, Any]]:
    """A rebuild in a thread, held inside its fill (lease taken, generation published) until released."""
    index = world.open()
    inside, release = threading.Event(), threading.Event()
    result: dict[str, Any] = {}
    copy = milvus_sync.copy_from_store

    def held_copy(*args: Any, **kwargs: Any) -> int:
        if threading.current_thread().name == "first-rebuild" and not inside.is_set():
            inside.set()
            release.wait(60)
        return copy(*args, **kwargs)

    monkeypatch.setattr(milvus_sync, "copy_from_store", held_copy)

    def run() -> None:
        try:
            result["count"] = milvus_sync.rebuild(index, world.data, world.factory, MODEL)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, name="first-rebuild", daemon=True)
    thread.start()
    assert inside.wait(60), result
    result["index"] = index
    return thread, release, inside, result


def test_a_second_rebuild_of_the_same_model_fails_fast_and_drops_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert issubclass(RebuildInProgressError, IndexerError) and issubclass(RebuildInProgressError, UserError)
    assert RebuildInProgressError.exit_code == 2
    Traffic(world, world.open(), seed=3).step()
    thread, release, _, first = _blocked_rebuild(world, monkeypatch)
    second = world.open()
    filling = second.next_record()
    assert filling is not None and filling.collection == second.name + "_g2"
    started = time.monotonic()
    with pytest.raises(RebuildInProgressError, match="another `indexer rebuild-index` is rebuilding"):
        milvus_sync.rebuild(second, world.data, world.factory, MODEL)
    assert time.monotonic() - started < 5, "refused at once, not after a fill"
    gens = second.generations.generations(second._client, second.name)
    assert filling.collection in gens and second.next_record() == filling, "the first one's work is intact"
    release.set()
    thread.join(60)
    assert "error" not in first and first["count"] == len(world.live()) > 0
    assert second.collection == filling.collection
    assert second.ids().tolist() == world.live()


def test_a_rebuild_takes_over_an_expired_lease_and_drops_the_dead_ones_generation(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    Traffic(world, world.open(), seed=4).step()
    index = world.open()
    dead = index.new_generation()  # what a rebuild that crashed mid-fill left: a half-filled generation...
    index.write_next_record(
        NextRecord("crashed-host:4242:deadbeef", time.time() - 5, dead)
    )  # ...and its lease
    with caplog.at_level(logging.WARNING, logger="indexer.milvus_rebuild_lease"):
        count = milvus_sync.rebuild(index, world.data, world.factory, MODEL)
    assert "taking over the rebuild of Milvus name" in caplog.text and "crashed-host:4242" in caplog.text
    assert count == len(world.live()) > 0
    gens = index.generations.generations(index._client, index.name)
    assert dead not in gens and gens == [index.collection] and index.next_record() is None
    assert index.ids().tolist() == world.live()


def test_a_rebuild_that_lost_its_lease_stops_before_switching(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    Traffic(world, world.open(), seed=5).step()
    thread, release, _, first = _blocked_rebuild(world, monkeypatch)
    index = first["index"]
    before = index.collection
    filling = index.next_record()
    assert filling is not None
    # Another rebuild took the lease over (as after the first one stalled past it).
    index.write_next_record(NextRecord("other-host:1:cafe", time.time() + 60, ""))
    release.set()
    thread.join(60)
    assert isinstance(first.get("error"), RebuildInProgressError), first
    assert "lost its lease" in str(first["error"])
    assert index.collection == before, "no switch"
    assert filling.collection not in index.generations.generations(index._client, index.name)
    record = index.next_record()
    assert record is not None and record.owner == "other-host:1:cafe", "the other rebuild's record stays"


class MemoryIndex:
    """Just the next record, in memory (a lease needs nothing else of MilvusIndex)."""

    name = "tvs_m"

    def __init__(self) -> None:
        self.record: NextRecord | None = None

    def next_record(self) -> NextRecord | None:
        return self.record

    def write_next_record(self, record: NextRecord | None) -> None:
        self.record = record


def test_the_lease_is_renewed_while_held_and_cleared_after() -> None:
    from indexer.milvus_rebuild_lease import RebuildLease

    index = MemoryIndex()
    with RebuildLease(index, lease_s=0.3, settle_s=0.0) as lease:  # type: ignore[arg-type]
        first = index.record
        assert first is not None and first.owner == lease.owner
        time.sleep(0.45)  # past the lease: a heartbeat (every 0.1 s) has moved it on
        renewed = index.record
        assert renewed is not None and renewed.expires > first.expires + 0.2
        assert renewed.expires > time.time()
        with pytest.raises(RebuildInProgressError):  # a second claimant meanwhile
            RebuildLease(index, lease_s=0.3, settle_s=0.0).__enter__()  # type: ignore[arg-type]
    assert index.record is None
