"""The API's in-memory index: snapshot load/rebuild, following the change feed, model checks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.ingest import delete_video, ingest_file
from indexer.live_index import IndexMismatchError, LiveIndex
from indexer.paths import DataDir
from indexer.synth import write_pattern_video
from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex
from indexer.worker import Worker
from model.checkpoint import load_model, save_checkpoint
from model.tokenbinder import TokenBinder

T, D = 4, 32


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return load_model("tiny")


@pytest.fixture
def env(migrated_sqlite_url: str, tmp_path: Path, model: TokenBinder) -> Iterator[tuple]:
    data = DataDir(tmp_path / "data").ensure()
    engine = make_engine(migrated_sqlite_url)
    factory = make_session_factory(engine)
    worker = Worker(factory, data, model)
    counter = iter(range(1000))

    def index_one() -> int:
        """Ingest and index a new clip (as a worker process would); returns its video id."""
        i = next(counter)
        path = write_pattern_video(tmp_path / f"clip{i}.mp4", 1.0 + 0.25 * i, 64, 48, 8, gop=8)
        video_id = ingest_file(factory, data, path, model_id=model.model_id, mode="in_place").video_id
        assert worker.run_once()
        return video_id

    yield data, factory, index_one
    worker.close()
    engine.dispose()


def _live(data: DataDir, factory: sessionmaker[Session], model: TokenBinder, **kw) -> LiveIndex:
    return LiveIndex(data, factory, model.model_id, D, T, follow_interval_s=0.05, **kw)


def _segment_ids(factory: sessionmaker[Session], model_id: str, video_id: int | None = None) -> list[int]:
    with session_scope(factory) as session:
        if video_id is None:
            return catalog.segment_ids_for_model(session, model_id)
        return [s.id for s in catalog.segments_for_video(session, video_id, model_id)]


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_open_builds_searches_and_reads_tokens(env, model: TokenBinder) -> None:
    data, factory, index_one = env
    index_one(), index_one()
    ids = _segment_ids(factory, model.model_id)
    with _live(data, factory, model) as live:
        assert live.size == 2 and live.factory == "Flat"
        store = TokenStore(data.tokens_dir(model.model_id), T, D, readonly=True)
        queries = store.get_cls(ids).astype(np.float32)
        scores, found = live.search(queries, 2)
        assert found[:, 0].tolist() == ids, "each segment's own CLS finds it first"
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-2)
        tokens = live.tokens(ids[::-1])
        assert tokens.shape == (2, T, D) and tokens.dtype == np.float16
        np.testing.assert_array_equal(tokens, store.get_tokens(ids[::-1]))


def test_snapshot_reload_catch_up_and_rebuild_when_unusable(env, model: TokenBinder) -> None:
    data, factory, index_one = env
    index_one()
    with _live(data, factory, model) as live:
        manifest = live.snapshot()
    assert (manifest["model_id"], manifest["count"]) == (model.model_id, 1) and manifest["last_seq"] >= 1
    second, _ = index_one(), index_one()
    gone = _segment_ids(factory, model.model_id, second)
    delete_video(factory, data, second)
    expected = _segment_ids(factory, model.model_id)
    assert len(expected) == 2 and not set(gone) & set(expected)
    with _live(data, factory, model) as live:  # the snapshot, then the changes made since
        assert live.ids().tolist() == expected

    raw = bytearray(data.index_path(model.model_id).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.index_path(model.model_id).write_bytes(bytes(raw))
    with _live(data, factory, model) as live:
        assert live.ids().tolist() == expected, "a corrupt snapshot is rebuilt from the token store"

    VectorIndex(D).save(data.index_path(model.model_id), {"model_id": "another-model", "last_seq": 10**6})
    with _live(data, factory, model) as live:
        assert live.ids().tolist() == expected, "another model's snapshot is not trusted"


def test_other_processes_see_new_videos_soon_and_deletions_at_once(env, model: TokenBinder) -> None:
    data, factory, index_one = env
    index_one()
    with _live(data, factory, model) as api_a, _live(data, factory, model) as api_b:
        assert api_a.size == api_b.size == 1
        video_id = index_one()  # committed by "the worker process"
        new_ids = _segment_ids(factory, model.model_id, video_id)
        for api in (api_a, api_b):
            assert _wait(lambda api=api: bool(api.ids().tolist()[-1:] == new_ids), timeout_s=3.0)
        query = TokenStore(data.tokens_dir(model.model_id), T, D, readonly=True).get_cls(new_ids)
        assert api_b.search(query.astype(np.float32), 1)[1][0, 0] == new_ids[0]

        delete_video(factory, data, video_id)
        for api in (api_a, api_b):
            assert _wait(lambda api=api: new_ids[0] not in api.search(query.astype(np.float32), 2)[1], 1.0)
        assert api_a.size == api_b.size == 1


def test_a_different_active_model_is_refused(env, model: TokenBinder, tmp_path: Path) -> None:
    data, factory, index_one = env
    index_one()  # makes the tiny preset the active model
    other = load_model(str(save_checkpoint(model, tmp_path / "ckpt")))
    with pytest.raises(IndexMismatchError, match="indexer reindex --model"):
        LiveIndex(data, factory, other.model_id, D, T).open()
    with pytest.raises(IndexMismatchError, match="dim="):
        LiveIndex(data, factory, model.model_id, 64, T).open()
