"""The API's in-memory index: snapshot load/rebuild, following the change feed, model checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import IndexMismatchError
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.index_device import IndexDeviceError
from indexer.ingest import delete_video, ingest_file
from indexer.live_index import IndexConfigError, LiveIndex, open_for_model
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex
from indexer.worker import Worker
from model.checkpoint import load_model, save_checkpoint
from model.tokenbinder import TokenBinder
from synth.generator import write_pattern_video

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


SYNTHETIC = "synthetic-32"  # the active model of the synthetic_library fixture (dim 32, T=1)


def _open_synthetic(root: Path, url: str, factory: str, **kw) -> tuple[LiveIndex, Callable[[], None]]:
    engine = make_engine(url)
    live = open_for_model(DataDir(root), make_session_factory(engine), SYNTHETIC, factory, **kw)
    live.open(follow=False)

    def close() -> None:
        live.close()
        engine.dispose()

    return live, close


def _top10(live: LiveIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return live.search(queries, 10)


def test_rerank_turns_an_approximate_ivf_top10_into_the_exact_one(synthetic_library) -> None:
    root, url, vecs = synthetic_library
    rng = np.random.default_rng(5)
    queries = vecs[rng.choice(len(vecs), 30, replace=False)] + 0.3 * rng.standard_normal((30, 32))
    queries = queries.astype(np.float32)
    exact, close = _open_synthetic(root, url, "Flat")
    try:
        assert exact.rerank == 0  # Flat is exact: nothing to re-score by default
        want_s, want = _top10(exact, queries)
    finally:
        close()
    ivf = "IVF64,PQ8x4np"
    approx, close = _open_synthetic(root, url, ivf, nprobe=1, rerank=0)
    try:
        assert approx.factory == ivf and approx.search_settings() == {
            "nprobe": 1,
            "ef_search": None,
            "rerank": 0,
        }
        _, got = _top10(approx, queries)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
        assert recall < 0.8, recall  # one list of 64 and PQ codes: true neighbours are missed
    finally:
        close()
    approx, close = _open_synthetic(root, url, ivf, nprobe=32, rerank=0)
    try:
        _, got = _top10(approx, queries)
        assert not np.array_equal(got, want)  # enough lists, but PQ's approximate scores misorder them
    finally:
        close()
    reranked, close = _open_synthetic(root, url, ivf, nprobe=32, rerank=300)
    try:
        scores, got = _top10(reranked, queries)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores, want_s, atol=1e-5)  # exact cosines, not PQ's estimates
        # A larger k (a filtered query's over-fetch) is re-scored whole: still sorted exact cosines.
        s300, i300 = reranked.search(queries[:3], 300)
        assert (np.diff(s300, axis=1) <= 0).all()
        norm = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        q = queries[:3] / np.linalg.norm(queries[:3], axis=1, keepdims=True)
        np.testing.assert_allclose(s300, np.take_along_axis(q @ norm.T, i300 - 1, axis=1), atol=1e-3)
    finally:
        close()


def test_the_default_rerank_is_on_for_approximate_factories_only(synthetic_library) -> None:
    root, url, _ = synthetic_library
    live, close = _open_synthetic(root, url, "HNSW16", ef_search=24)
    try:
        assert live.search_settings() == {"nprobe": None, "ef_search": 24, "rerank": 100}
    finally:
        close()


@pytest.mark.parametrize(
    ("factory", "knobs", "message"),
    [
        ("Flat", {"nprobe": 4}, "nprobe=4 needs an IVF factory"),
        ("IVF16,Flat", {"ef_search": 8}, "ef_search=8 needs an HNSW factory"),
        ("Flat", {"rerank": -1}, "rerank must be >= 0"),
        ("NoSuchIndex", {}, "faiss cannot build factory 'NoSuchIndex'"),
    ],
)
def test_index_settings_that_do_not_fit_fail_when_the_index_is_made(
    env, model: TokenBinder, factory: str, knobs: dict, message: str
) -> None:
    data, session_factory, _ = env
    with pytest.raises(IndexConfigError, match=message):
        LiveIndex(data, session_factory, model.model_id, D, T, factory, **knobs)


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")
def test_an_index_device_faiss_cannot_use_fails_and_auto_says_why_it_is_on_the_cpu(
    env, model: TokenBinder, caplog: pytest.LogCaptureFixture
) -> None:
    data, session_factory, index_one = env
    with pytest.raises(IndexDeviceError, match=r"'cuda:1' cannot be used: faiss has no GPU support"):
        _live(data, session_factory, model, device="cuda:1")
    index_one()
    with caplog.at_level(logging.INFO, logger="indexer.live_index"):
        with _live(data, session_factory, model, device="auto") as live:
            assert live.device == "cpu" and "no GPU support" in live.device_reason
            assert live.size == 1
    lines = [r.getMessage() for r in caplog.records if "FAISS index is on the CPU" in r.getMessage()]
    assert len(lines) == 1 and "index device auto: faiss has no GPU support" in lines[0]


@pytest.mark.gpu
@pytest.mark.parametrize(("factory", "knobs"), [("Flat", {}), ("IVF64,SQ8", {"nprobe": 64, "rerank": 100})])
def test_a_gpu_index_finds_the_cpu_top10_and_its_snapshot_loads_on_the_cpu(
    synthetic_library, factory: str, knobs: dict
) -> None:
    root, url, vecs = synthetic_library
    queries = vecs[:20] + 0.3 * np.random.default_rng(2).standard_normal((20, 32)).astype(np.float32)
    cpu, close = _open_synthetic(root, url, "Flat")
    try:
        want_s, want = _top10(cpu, queries)
    finally:
        close()
    gpu, close = _open_synthetic(root, url, factory, device="cuda", **knobs)
    try:
        assert gpu.device == "cuda:0" and gpu.device_reason == ""
        scores, got = _top10(gpu, queries)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores, want_s, atol=2e-3)
        gpu.snapshot()
    finally:
        close()
    again, close = _open_synthetic(root, url, factory, **knobs)  # device "cpu"
    try:
        assert again.device == "cpu" and again.factory == factory and again.size == len(vecs)
        np.testing.assert_array_equal(_top10(again, queries)[1], want)
    finally:
        close()


@pytest.mark.gpu
def test_adds_and_deletes_reach_a_gpu_index(env, model: TokenBinder) -> None:
    data, factory, index_one = env
    first = index_one()
    with _live(data, factory, model, device="cuda") as live:
        assert live.device == "cuda:0"
        second = index_one()
        assert _wait(lambda: live.size == 2, 5)
        delete_video(factory, data, first)
        assert _wait(lambda: live.size == 1, 5)
        gone = set(_segment_ids(factory, model.model_id, first))
        kept = _segment_ids(factory, model.model_id, second)
        _, ids = live.search(np.ones((1, D), np.float32), 5)
        assert set(ids[0][ids[0] >= 0]) == set(kept) and not gone & set(ids[0])
