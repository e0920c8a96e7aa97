"""Searcher alone, over a fake SegmentIndex: filters, grouping, over-fetch, deleted videos, mixed batches.

The broad view's answers are scripted (the fake index ranks ids by a fixed score), the catalog is a small
SQLite file, and the model is the tiny preset: what is checked is the searcher's own logic, which the HTTP
tests reach only through a whole service.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.search_types import SearchFilter, SearchQuery
from app.searcher import Searcher
from indexer.catalog import Base, EmbeddingModel, Segment, Video
from indexer.db import make_engine, make_session_factory, session_scope
from model.checkpoint import load_model

VIDEOS = 6
SEGMENTS_PER_VIDEO = 5  # segment id = 100 * video + ordinal; broad score falls with the id
DELETED_VIDEO = 4


class FakeIndex:
    """Every segment, ranked by a fixed broad score whatever the query; counts the calls and the k asked."""

    def __init__(self, ids: Sequence[int], num_frames: int, dim: int) -> None:
        self.ids = np.asarray(sorted(ids), dtype=np.int64)
        self.scores = np.linspace(0.9, 0.1, len(self.ids), dtype=np.float32)
        self.calls: list[tuple[int, int]] = []  # (queries, k)
        self.token_reads: list[list[int]] = []
        self._shape = (num_frames, dim)

    @property
    def size(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((len(queries), k))
        k = min(k, len(self.ids))
        return np.tile(self.scores[:k], (len(queries), 1)), np.tile(self.ids[:k], (len(queries), 1))

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        self.token_reads.append([int(i) for i in ids])
        rng = np.random.default_rng(0)
        return rng.standard_normal((len(ids), *self._shape)).astype(np.float16)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").eval()


@pytest.fixture
def catalog_factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'catalog.db'}")
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    made = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with session_scope(factory) as session:
        session.add(EmbeddingModel(id="tiny-test", backbone="tiny", dim=32, num_frames=4, active=True))
        for v in range(1, VIDEOS + 1):
            session.add(
                Video(
                    id=v,
                    sha256=f"{v:064d}",
                    source=f"v{v}.mp4",
                    title=f"video {v}",
                    duration_s=10.0 * v,
                    status="deleted" if v == DELETED_VIDEO else "ready",
                    meta={"camera": "gopro" if v % 2 else "phone"},
                    created_at=made,
                )  # fmt: skip
            )
        session.flush()
        for v in range(1, VIDEOS + 1):
            for n in range(SEGMENTS_PER_VIDEO):
                session.add(
                    Segment(
                        id=100 * v + n,
                        video_id=v,
                        ordinal=n,
                        start_s=2.0 * n,
                        end_s=2.0 * n + 2,
                        model_id="tiny-test",
                    )  # fmt: skip
                )
    return factory


@pytest.fixture
def searcher(model, catalog_factory) -> tuple[Searcher, FakeIndex]:
    ids = [100 * v + n for v in range(1, VIDEOS + 1) for n in range(SEGMENTS_PER_VIDEO)]
    index = FakeIndex(ids, model.config.num_frames, model.config.embed_dim)
    return Searcher(model, index, catalog_factory, top_k=4), index


def _ids(outcome) -> list[int]:
    return [hit.segment.id for hit in outcome.hits]


def test_a_deleted_videos_segments_never_come_back(searcher) -> None:
    s, _ = searcher
    (out,) = s.search_batch([SearchQuery("anything", limit=30, rerank=False)])
    assert out.hits and all(hit.segment.video_id != DELETED_VIDEO for hit in out.hits)
    assert _ids(out)[:5] == [100, 101, 102, 103, 104]  # broad order, untouched without the focused view


def test_a_filter_keeps_only_what_passes_and_over_fetches_until_it_has_enough(searcher) -> None:
    s, index = searcher
    query = SearchQuery("x", limit=2, rerank=False, filter=SearchFilter(video_ids=frozenset({6})))
    (out,) = s.search_batch([query])
    assert {hit.segment.video_id for hit in out.hits} == {6} and len(out.hits) >= 2
    # Video 6's segments are the last ids: the first fetch (8 x what is needed) fell short, so it asked again.
    assert len(index.calls) >= 2 and index.calls[-1][1] > index.calls[0][1]


def test_meta_and_duration_filters_run_on_the_catalog_rows(searcher) -> None:
    s, _ = searcher
    meta = SearchFilter(meta=(("camera", "phone"),))
    (out,) = s.search_batch([SearchQuery("x", limit=30, rerank=False, filter=meta)])
    assert {hit.segment.video_id for hit in out.hits} == {2, 6}  # the even ones, less the deleted 4
    short = SearchFilter(max_duration_s=20.0)
    (out,) = s.search_batch([SearchQuery("x", limit=30, rerank=False, filter=short)])
    assert {hit.segment.video_id for hit in out.hits} == {1, 2}


def test_grouping_by_video_gives_each_video_once_in_its_best_segments_order(searcher) -> None:
    s, _ = searcher
    (out,) = s.search_batch([SearchQuery("x", limit=10, rerank=False, group_by="video")])
    videos = [hit.segment.video_id for hit in out.hits]
    assert videos == [1, 2, 3, 5, 6]
    assert _ids(out) == [100, 200, 300, 500, 600]


def test_a_mixed_batch_re_ranks_only_the_queries_that_ask(searcher) -> None:
    s, index = searcher
    both = s.search_batch([SearchQuery("a", limit=6, rerank=True), SearchQuery("b", limit=6, rerank=False)])
    reranked, broad = both
    assert reranked.reranked and not broad.reranked
    assert reranked.batch_size == broad.batch_size == 2
    assert all(hit.delta is None for hit in broad.hits)
    top = reranked.hits[: s.top_k]
    assert all(hit.delta is not None for hit in top) and all(
        hit.delta is None for hit in reranked.hits[s.top_k :]
    )
    # One token read for the batch: the re-ranking query's top k only.
    assert index.token_reads == [[100, 101, 102, 103]]
    # The focused view only reorders the top k; the rest keep broad order.
    assert sorted(h.segment.id for h in top) == [100, 101, 102, 103]
    assert [h.segment.id for h in reranked.hits[s.top_k :]][:2] == [104, 200]


def test_an_empty_index_answers_nothing_without_searching(model, catalog_factory) -> None:
    index = FakeIndex([], model.config.num_frames, model.config.embed_dim)
    (out,) = Searcher(model, index, catalog_factory).search_batch([SearchQuery("x")])
    assert out.hits == [] and index.calls == []
